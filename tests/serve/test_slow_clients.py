"""Issue 28, finding 6: sockets that trickle their headers are closed by the header deadline, one
address cannot hold more than its share of connections, and a normal client still gets /health.
Raw sockets against uvicorn running qforge.serve.connections' protocol (what `qforge serve` runs).
The assertions are on events (a 503 read, a socket closed by the server), never on elapsed time."""
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from qforge.serve.connections import ConnectionLimits, guarded_protocol

from .helpers import free_port

ATTACKER = "127.0.0.2"  # another loopback address: its own per-client count


@pytest.fixture
def server():
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    limits = ConnectionLimits(max_connections=32, max_per_client=4, header_timeout_s=1.0, body_timeout_s=2.0)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=guarded_protocol(limits))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(10)


def trickler(port: int) -> socket.socket:
    s = socket.socket()
    s.bind((ATTACKER, 0))
    s.settimeout(60)  # a bound for a broken server, not a measured time
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    return s


def closed_by_server(s: socket.socket) -> bool:
    """Keep trickling header lines until the server closes the socket (True) or 60 s pass (False)."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            s.sendall(b"X-Slow: 1\r\n")
            s.settimeout(0.2)
            if s.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset by the server
            return True
    return False


def test_trickled_headers_are_cut_and_a_normal_client_still_gets_health(server):
    port = server
    slow = [trickler(port) for _ in range(4)]
    extra = socket.socket()
    extra.bind((ATTACKER, 0))
    extra.settimeout(60)
    extra.connect(("127.0.0.1", port))
    answer = extra.recv(4096)  # the fifth from one address: answered at once, unread
    assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)  # another address: served meanwhile
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert all(closed_by_server(s) for s in slow)  # the header deadline is not reset by trickling
    for s in slow + [extra]:
        s.close()
    again = socket.socket()
    again.bind((ATTACKER, 0))
    again.settimeout(60)
    again.connect(("127.0.0.1", port))  # the address's count was given back on close
    again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert again.recv(4096).startswith(b"HTTP/1.1 200")
    again.close()


def test_serve_flags_reach_the_connection_guard_and_the_request_limits():
    import argparse

    from qforge.app import ServeConfig, connection_guard
    from qforge.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    cfg = serve.serve_config(parser.parse_args(
        ["--max-connections", "40", "--max-connections-per-client", "3", "--header-timeout", "2.5",
         "--body-timeout", "7", "--max-request-tokens", "999", "--max-scored-tokens", "77"]))
    assert (cfg.max_request_tokens, cfg.max_scored_tokens) == (999, 77)
    limits = connection_guard(cfg).connection_limits
    assert limits == ConnectionLimits(40, 3, 2.5, 7.0)
    defaults = ServeConfig()
    assert connection_guard(defaults).connection_limits.max_per_client == defaults.max_connections_per_client
    with pytest.raises(SystemExit):
        parser.parse_args(["--header-timeout", "0"])
