"""The outermost guard (qforge.serve.guards.CatchAll): a full disk is a 507 naming it, a client that
hangs up mid-stream is neither answered nor logged as an internal error, anything else is a 500."""
import asyncio
import errno
import json
import sqlite3

import pytest

from qforge.serve.guards import CatchAll, ClientDisconnected


def call(app) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(CatchAll(app)({"type": "http", "method": "POST", "path": "/v1/x"}, receive, send))
    return sent


def raising(exc, start_first=False):
    async def app(scope, receive, send):
        if start_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise exc
    return app


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 sqlite3.OperationalError("database or disk is full")])
def test_a_full_disk_is_507_naming_it_in_one_log_line(exc, capsys):
    start, body = call(raising(exc))
    assert start["status"] == 507
    error = json.loads(body["body"])["error"]
    assert error["code"] == "disk_full" and "disk is full" in error["message"]
    assert capsys.readouterr().err.count("\n") == 1


def test_a_hang_up_mid_stream_is_not_an_internal_error(capsys):
    def wrapped():  # as Starlette re-raises a handled exception once the answer has begun
        try:
            raise ClientDisconnected()
        except ClientDisconnected as exc:
            raise RuntimeError("Caught handled exception, but response already started.") from exc

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        wrapped()

    assert [m["type"] for m in call(app)] == ["http.response.start"]
    assert capsys.readouterr().err == ""


def test_anything_else_is_a_500(capsys):
    start, body = call(raising(KeyError("x")))
    assert start["status"] == 500 and json.loads(body["body"])["error"]["type"] == "server_error"
    assert "internal error on POST /v1/x" in capsys.readouterr().err
