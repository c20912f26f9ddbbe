"""OpenAI's error shape for the HTTP surface: {"error": {message, type, param, code}}.

APIError is what a route raises; `install_error_handlers` turns it, request validation failures,
Starlette's HTTP errors, the guards' refusals and any other exception into that shape.
"""
from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..guards import BodyTooLarge, Busy, ClientDisconnected


class ClientGone(ClientDisconnected):
    """The client disconnected before its answer was ready."""


class APIError(Exception):
    """An answer in OpenAI's error shape: HTTP status, message, type, the offending parameter, a code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|tuple|literal|constrained-[a-z]+|[a-z-]+\[.*\])$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # pydantic names union members in the location ("prompt.str", "prompt.list[int]"): keep field names
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_, exc: BodyTooLarge):
        return error_response(APIError(413, str(exc.detail), code="body_too_large", headers={"Connection": "close"}))

    @app.exception_handler(Busy)
    async def _busy(_, exc: Busy):
        return error_response(APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                                        code="queue_full", headers={"Retry-After": "1"}))

    @app.exception_handler(ClientGone)
    async def _gone(_, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _crash(_, exc: Exception):
        return error_response(internal_error(exc))


def internal_error(exc: BaseException) -> APIError:
    """The answer to an exception nothing else handled: 507 naming a full disk (the request may be
    retried once there is room), else a plain 500."""
    from ...fileio import is_disk_full
    if is_disk_full(exc):
        return APIError(507, "the server's disk is full: nothing was stored; retry later", "server_error",
                        code="disk_full")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error")

