"""Bounds on what one request can cost the server, and no dropped connection after an error.

  LimitBody      ASGI middleware: the body limit, counted while the body is read (a chunked body,
                 which has no Content-Length, is stopped at the limit too); a declared length over
                 the limit is refused unread.
  CatchAll       ASGI middleware: an unexpected exception becomes a 500 JSON answer and ends there,
                 so the server keeps the keep-alive connection (re-raising it made uvicorn drop the
                 connection and reset the client's next request on it).
  OffLoop        runs CPU work (chat templates, tokenising) on a small thread pool, with a bound on
                 how many may wait: the event loop keeps answering /health and streams meanwhile.
  lone_surrogate a request string that cannot be UTF-8 (a lone surrogate like "\\ud800") -> 400.
"""
from __future__ import annotations

import asyncio
import json
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

from starlette.exceptions import HTTPException

FLOAT32_TINY = 1e-30  # below float32's normal range a top_p compares as 0: the top token alone is meant


class BodyTooLarge(HTTPException):
    """Raised from the wrapped `receive` when the body read so far passes the limit."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body larger than {max_bytes} bytes")
        self.max_bytes = max_bytes


def _json_error(status: int, message: str, type: str, code: str | None) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class LimitBody:
    """At most `max_bytes` of body per request (the longest matching path prefix of `overrides`
    gives a route its own limit)."""

    def __init__(self, app, max_bytes: int, overrides: dict[str, int] | None = None):
        self.app, self.max_bytes, self.overrides = app, max_bytes, overrides if overrides is not None else {}

    def limit(self, path: str) -> int:
        prefixes = [p for p in self.overrides if path == p or path.startswith(p.rstrip("/") + "/")]
        return self.overrides[max(prefixes, key=len)] if prefixes else self.max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.limit(scope.get("path", ""))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return await self._refuse(send, max_bytes)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge(max_bytes)
            return message

        watched = _WatchedSend(send)
        try:
            await self.app(scope, counted_receive, watched)
        except BodyTooLarge:
            if not watched.started:
                await self._refuse(send, max_bytes)

    @staticmethod
    async def _refuse(send, max_bytes: int) -> None:
        start, body = _json_error(413, f"request body larger than {max_bytes} bytes", "invalid_request_error",
                                  "body_too_large")
        start["headers"].append((b"connection", b"close"))  # the rest of the body is never read
        await send(start)
        await send({"type": "http.response.body", "body": body})


class _WatchedSend:
    """An ASGI `send` that remembers whether the response has started (a later error can no longer
    be answered with a status of its own)."""

    def __init__(self, send):
        self.send, self.started = send, False

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class ClientDisconnected(Exception):
    """The client went away mid-answer: nothing to answer, nothing to log."""


class CatchAll:
    """An exception that escapes the app becomes a 500 answer (when none has started) and is not
    re-raised: the connection stays usable for the client's next request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        watched = _WatchedSend(send)
        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # noqa: BLE001 - logged here, answered as a 500 (507 for a full disk)
            from ..fileio import is_disk_full
            if _caused_by(exc, ClientDisconnected):
                return  # a hang-up mid-stream is the client's choice, not an internal error
            where = f"{scope.get('method')} {scope.get('path')}"
            full = is_disk_full(exc)
            if full:
                print(f"qforge serve: disk full on {where}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                      file=sys.stderr)
            else:
                print(f"qforge serve: internal error on {where}:", file=sys.stderr)
                traceback.print_exception(exc, file=sys.stderr)
            if not watched.started:
                start, body = (_json_error(507, "the server's disk is full: nothing was stored; retry later",
                                           "server_error", "disk_full") if full else
                               _json_error(500, f"internal error: {type(exc).__name__}", "server_error", None))
                await send(start)
                await send({"type": "http.response.body", "body": body})


def _caused_by(exc: BaseException | None, kind: type) -> bool:
    """Whether `exc` or an exception it was raised from (Starlette wraps one a handler took after
    the answer began) is a `kind`."""
    for _ in range(5):
        if exc is None:
            return False
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Busy(Exception):
    """More CPU work is waiting than the bound allows."""


class OffLoop:
    """CPU work off the event loop: `workers` threads, at most `max_waiting` calls queued or running."""

    def __init__(self, workers: int = 2, max_waiting: int = 64):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qforge-tokenize")
        self.max_waiting = max_waiting
        self.waiting = 0

    async def run(self, fn, *args):
        if self.waiting >= self.max_waiting:
            raise Busy(f"{self.waiting} requests are being tokenised")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.waiting -= 1


def lone_surrogate(value, where: str = "") -> str | None:
    """The parameter path of the first string in `value` (dicts, lists) that is not valid UTF-8
    text, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = lone_surrogate(k, where) or lone_surrogate(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None
