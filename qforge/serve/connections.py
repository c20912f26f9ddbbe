"""Slow and greedy clients bounded at the connection, before HTTP parsing reaches the app.

uvicorn's h11 server closes an idle keep-alive connection after `timeout_keep_alive`, but any byte
resets that timer, so a client sending one header line every few seconds holds its socket (and a
file descriptor) for ever; thousands of them exhaust the descriptors and `accept()` fails for
everyone. `guarded_protocol(limits)` returns uvicorn's H11Protocol with three bounds added:

  header time-out  a request's line and headers must be complete within `header_timeout_s` of the
                   connection opening (or of the previous response ending): else the socket closes;
  body time-out    its body within `body_timeout_s` of that same start;
  connection caps  at most `max_connections` open in all and `max_per_client` from one client
                   address; one over is answered 503 and closed at once, unread.

The time-outs are deadlines over the whole read, not idle timers, so trickling does not extend
them. Pass the class as uvicorn's `http=` (qforge.app.run_server does).
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
           b"content-length: %d\r\n\r\n%s")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000      # open at once, in all
    max_per_client: int = 128        # open at once from one client address
    header_timeout_s: float = 10.0   # request line + headers complete within this, from the start
    body_timeout_s: float = 60.0     # the body complete within this, from the same start


class ConnectionBook:
    """Open connections, in all and by client address (thread-safe: tests run servers in threads)."""

    def __init__(self):
        self.lock, self.by_address, self.total = threading.Lock(), Counter(), 0

    def admit(self, address: str, limits: ConnectionLimits) -> str | None:
        """Count a new connection in; None, or why it is refused (then it is not counted)."""
        with self.lock:
            if self.total >= limits.max_connections:
                return f"the server holds its maximum of {limits.max_connections} connections"
            if self.by_address[address] >= limits.max_per_client:
                return f"this address holds its maximum of {limits.max_per_client} connections"
            self.total += 1
            self.by_address[address] += 1
            return None

    def leave(self, address: str) -> None:
        with self.lock:
            self.total -= 1
            self.by_address[address] -= 1
            if self.by_address[address] <= 0:
                del self.by_address[address]


def guarded_protocol(limits: ConnectionLimits, book: ConnectionBook | None = None) -> type:
    """uvicorn's H11Protocol with the time-outs and caps of `limits` (module docstring)."""
    shared = book or ConnectionBook()

    class GuardedH11Protocol(H11Protocol):
        connection_limits, book = limits, shared

        def connection_made(self, transport) -> None:
            peer = transport.get_extra_info("peername")
            self._address = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "unknown"
            self._deadline = None
            why = self.book.admit(self._address, self.connection_limits)
            self._refused = why is not None
            if self._refused:
                body = b'{"error": {"message": "%s; retry later", "type": "server_error", "param": null, ' \
                       b'"code": "too_many_connections"}}' % why.encode()
                transport.write(REFUSED % (len(body), body))
                transport.close()
                return
            super().connection_made(transport)
            self._arm(self.connection_limits.header_timeout_s)

        def connection_lost(self, exc) -> None:
            if self._refused:
                return
            self._disarm()
            self.book.leave(self._address)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm(self.connection_limits.header_timeout_s)  # the next request's headers, from now

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, self.loop.time())

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, started: float) -> None:
            """Headers still incomplete: close. Body still arriving: close at the body deadline."""
            self._deadline = None
            state = self.conn.their_state
            if state is h11.IDLE:
                self.transport.close()
            elif state is h11.SEND_BODY:
                left = started + self.connection_limits.body_timeout_s - self.loop.time()
                if left > 0:
                    self._deadline = self.loop.call_later(left, self._expired, started)
                elif self.cycle is None or not self.cycle.response_started:
                    self.transport.close()

    return GuardedH11Protocol
