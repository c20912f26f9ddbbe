"""The soak's faults added by issue 28 (benchmarks/soak.py runs them): a PostgreSQL outage, a full
disk while a job trains, slow clients, and memory-bomb requests; and the end check of metric events.

  pg-outage        the job database (a throw-away PostgreSQL, --database postgres) stopped for 5-20 s
                   (pg_ctl -m immediate), then started again; job endpoints answer 503
                   database_unavailable meanwhile (counted apart, as db_down_503), never another 5xx
  fill-training    waits until a job is running, then fills the data dir's tmpfs as fill-disk does: the
                   trainer meets ENOSPC mid-run, the job waits and resumes
  slow-clients     --slow-sockets connections that send one header line every 2 s for 20 s (never
                   finishing a request), while /health is asked every second: its slowest answer and
                   how many asks got none are reported (health_max_s, health_missed)
  memory-bomb      requests that are as large as the API lets a body be: embeddings of 256 inputs of
                   --bomb-tokens token ids, a completion of one --bomb-tokens-token prompt with n=16,
                   echo and logprobs; a 4xx naming a limit or a 200 are fine, a 5xx or a dead server
                   is not (the server process is checked after each)
"""
from __future__ import annotations

import socket
import threading
import time

import httpx


class PgOutage:
    """The soak's PostgreSQL: tests/jobs/postgres.py's throw-away server, stopped and started on demand."""

    def __init__(self):
        from tests.jobs.postgres import Postgres, find_bin, missing_reason
        why = missing_reason()
        if why:
            raise RuntimeError(why)
        self.server, self.pg_ctl = Postgres().start(), find_bin("pg_ctl")
        self.url = self.server.url
        self.down = threading.Event()

    def options(self) -> str:
        s = self.server
        return f"-p {s.port} -k {s.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"

    def outage(self, hold: float) -> None:
        s = self.server
        self.down.set()
        try:
            s._run(self.pg_ctl, "-D", str(s.data), "-m", "immediate", "-w", "stop")
            print(f"pg-outage: the job database is down for {hold:.0f} s", flush=True)
            time.sleep(hold)
        finally:
            s._run(self.pg_ctl, "-D", str(s.data), "-o", self.options(), "-l", str(s.folder / "log"), "-w", "-t",
                   "60", "start")
            time.sleep(3)  # answers to requests that met the outage may still arrive
            self.down.clear()

    def stop(self) -> None:
        self.server.stop()


def is_db_down_answer(r: httpx.Response) -> bool:
    try:
        if not r.is_stream_consumed:
            r.read()
        return r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
    except (ValueError, KeyError, TypeError, httpx.HTTPError):
        return False


def wait_for_running_job(url: str, keys: list[str], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in keys:
            try:
                r = httpx.get(url + "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=30)
                if r.status_code == 200 and any(j["status"] == "running" for j in r.json()["data"]):
                    return True
            except httpx.HTTPError:
                pass
        time.sleep(1)
    return False


SLOW_CLIENT_ADDRESS = "127.0.0.2"  # Linux answers the whole of 127.0.0.0/8 on the loopback device


def slow_clients(port: int, url: str, sockets: int, seconds: float, stats: dict) -> None:
    """Open `sockets` connections that drip one header line every 2 s; ask /health every second."""
    opened: list[socket.socket] = []
    for _ in range(sockets):
        try:
            # from another loopback address than the soak's clients: the per-address cap sheds the
            # attacker's sockets, not everyone's (on one address the clients would share its cap)
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(SLOW_CLIENT_ADDRESS, 0))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            opened.append(s)
        except OSError:
            stats["refused_sockets"] = stats.get("refused_sockets", 0) + 1
    deadline, n = time.monotonic() + seconds, 0
    try:
        while time.monotonic() < deadline:
            for s in list(opened):
                try:
                    s.sendall(f"X-Slow-{n}: {'y' * 10}\r\n".encode())
                except OSError:
                    opened.remove(s)  # the server closed it: the bound works
                    stats["closed_by_server"] = stats.get("closed_by_server", 0) + 1
            n += 1
            for _ in range(2):
                started = time.monotonic()
                try:
                    if httpx.get(url + "/health", timeout=10).status_code != 200:
                        raise httpx.HTTPError("not answered 200")
                    stats["health_max_s"] = max(stats.get("health_max_s", 0.0), time.monotonic() - started)
                except httpx.HTTPError:
                    stats["health_missed"] = stats.get("health_missed", 0) + 1
                time.sleep(1)
    finally:
        for s in opened:
            s.close()


def memory_bombs(url: str, key: str, tokens: int, answer) -> list[int]:
    """The largest bodies the API accepts in shape; their statuses (`answer` tallies each response)."""
    headers = {"Authorization": f"Bearer {key}"}
    ids = [(i * 7919) % 30000 + 100 for i in range(tokens)]
    statuses = []
    bodies = [("/v1/embeddings", {"model": "tiny", "input": [ids] * 256}),
              ("/v1/completions", {"model": "tiny", "prompt": ids, "n": 16, "max_tokens": 1, "echo": True,
                                   "logprobs": 5})]
    for path, body in bodies:
        try:
            r = answer(f"memory-bomb {path}", httpx.post(url + path, headers=headers, json=body, timeout=300))
            statuses.append(r.status_code)
        except httpx.HTTPError as exc:
            print(f"memory-bomb {path}: no answer ({exc!r})", flush=True)
            statuses.append(0)
    return statuses


def events_lost(url: str, key: str, job: dict) -> int:
    """Steps of a succeeded job's results file (step_metrics.csv) without exactly one metrics event."""
    headers = {"Authorization": f"Bearer {key}"}
    if not job.get("result_files"):
        return 0
    csv = httpx.get(url + f"/v1/files/{job['result_files'][0]}/content", headers=headers, timeout=120)
    if csv.status_code != 200:
        print(f"job {job['id']}: results file answered {csv.status_code}", flush=True)
        return 1
    steps = {int(line.split(",")[0]) for line in csv.text.splitlines()[1:] if line.strip()}
    r = httpx.get(url + f"/v1/fine_tuning/jobs/{job['id']}/events", headers=headers, params={"limit": 1000},
                  timeout=120)
    counted: dict[int, int] = {}
    for event in r.json()["data"]:
        if event.get("type") == "metrics":
            step = int(event["data"]["step"])
            counted[step] = counted.get(step, 0) + 1
    lost = sum(1 for s in steps if counted.get(s, 0) != 1) + sum(1 for s in counted if s not in steps)
    if lost:
        print(f"job {job['id']}: {lost} step(s) without exactly one metrics event", flush=True)
    return lost
