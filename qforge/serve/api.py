"""The OpenAI-compatible HTTP surface over an Engine and an AdapterRegistry.

Routes: GET /v1/models, GET /v1/models/{id}, DELETE /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions (`stream: true` gives server-sent events in OpenAI's chunk format ending
with `data: [DONE]`), POST /v1/embeddings (embeddings.py), POST /v1/adapters {name, path},
GET /v1/adapters, DELETE /v1/adapters/{name}, GET /v1/usage, GET /metrics (Prometheus text),
GET /health.

Generation options beyond sampling: log-probs (`logprobs`, `echo`, `top_logprobs`: logprobs.py),
`response_format` json_object / json_schema and `tools` / `tool_choice` (structured.py, tools.py).
With API keys, every route but /health needs `Authorization: Bearer KEY`; keys have roles
(qforge.serve.auth): /metrics, every key's usage and the server-wide adapters are the operator's, a
user key sees and manages only its own. Errors are OpenAI's shape: {"error": {message, type, param, code}}.

`create_app` builds the app in-process (tests run it under uvicorn in a thread); it does not own the
engine's thread beyond starting it.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import ANONYMOUS, AdapterOwners, Caller, KeyRing, check_adapter_name
from .embeddings import add_embedding_routes
from .guards import FLOAT32_TINY, BodyTooLarge, Busy, CatchAll, ClientDisconnected, LimitBody, OffLoop, lone_surrogate
from .engine import Engine, Event, QueueFull, Request as GenRequest, RequestError, SamplingParams
from .logprobs import MAX_TOP_LOGPROBS, chat_logprobs, completion_logprobs, trim_to_text
from .structured import GrammarError, compile_plan
from .tools import OutputPlan, output_plan, render_messages, template_supports_tools
from .metrics import Metrics, UsageLedger
from .registry import AdapterError, AdapterRegistry

DEFAULT_CHAT_MAX_TOKENS = 512  # when a chat request gives none: the rest of the context, at most this
MAX_STOP = 4
DISCONNECT_POLL_S = 0.25
MAX_BODY_BYTES = 8 * 2 ** 20


# ---- errors --------------------------------------------------------------------------------------
class ClientGone(ClientDisconnected):
    """The client disconnected before its answer was ready."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|tuple|literal|[a-z-]+\[.*\])$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # pydantic names union members in the location ("prompt.str", "prompt.list[int]"): keep field names
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_, exc: BodyTooLarge):
        return _error_response(APIError(413, str(exc.detail), code="body_too_large", headers={"Connection": "close"}))

    @app.exception_handler(Busy)
    async def _busy(_, exc: Busy):
        return _error_response(APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                                        code="queue_full", headers={"Retry-After": "1"}))

    @app.exception_handler(ClientGone)
    async def _gone(_, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _crash(_, exc: Exception):
        return _error_response(internal_error(exc))


def internal_error(exc: BaseException) -> APIError:
    """The answer to an exception nothing else handled: 507 naming a full disk (the request may be
    retried once there is room), else a plain 500."""
    from ..fileio import is_disk_full
    if is_disk_full(exc):
        return APIError(507, "the server's disk is full: nothing was stored; retry later", "server_error",
                        code="disk_full")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error")


# ---- request bodies ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # "stream": "yes", "n": "2", [true] as ids: 400

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 63 - 1)  # a 64-bit generator seed
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: keep going past EOS (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def unsupported(self) -> None:
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(self, field):
                raise APIError(400, f"{field} is not supported by this server", param=field, code="unsupported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} sequences", param="stop")


class CompletionBody(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict | None = None  # vLLM's extension: json_object / json_schema for completions too

    def output_plan(self) -> OutputPlan:
        try:
            return output_plan(None, None, self.response_format)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc

    def unsupported(self) -> None:
        super().unsupported()
        if (self.best_of or 1) > 1 or self.suffix:
            raise APIError(400, "best_of and suffix are not supported", param="best_of", code="unsupported")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (it scores the prompt only)", param="max_tokens")

    def logprob_options(self) -> tuple[int | None, bool]:
        """(alternatives per token or None for no log-probs, score the prompt too)."""
        return self.logprobs, self.echo and self.logprobs is not None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None       # a tool result's call

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatBody(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def output_plan(self) -> OutputPlan:
        try:
            return output_plan(self.tools, self.tool_choice, self.response_format)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc

    def logprob_options(self) -> tuple[int | None, bool]:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, False



class AdapterBody(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    path: str


# ---- engine <-> event loop -----------------------------------------------------------------------
class _Events:
    """Events of several engine requests, handed to the event loop as (choice index, Event)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int):
        def put(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass
        return put


def _raise_for_event(event: Event) -> None:
    if event.status == 404:
        raise APIError(404, event.error or "model not found", param="model", code="model_not_found")
    raise APIError(event.status, event.error or "generation failed", "server_error")


class _Generator:
    """One HTTP generation request: n choices over one or more prompts, run by the engine."""

    def __init__(self, app_state: "_State", kind: str, body: _Generation, prompts: list[list[int]],
                 max_tokens: list[int], key_id: str, plan: OutputPlan | None = None, grammar=None):
        self.s, self.kind, self.body, self.key_id = app_state, kind, body, key_id
        self.plan, self.grammar = plan or OutputPlan(), grammar  # grammar: makes a GrammarProcessor per choice
        self.adapter = app_state.resolve_model(body.model, key_id)
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompts = prompts
        self.events = _Events()
        self.closed = False
        self.next_check = 0.0
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        self.top_k, score_prompt = body.logprob_options()
        self.echo = kind == "completion" and body.echo
        self.offsets: dict[int, int] = {}  # streaming: characters sent so far per choice (text_offset)
        self.requests = []
        for p, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
            for k in range(body.n):
                seed = None if body.seed is None else body.seed + k
                params = _params(limit, body.temperature, body.top_p, stops, seed, body.ignore_eos,
                                 logprobs=self.top_k, prompt_logprobs=score_prompt)
                index = p * body.n + k
                processor = self.grammar() if self.grammar is not None else None
                self.requests.append(GenRequest(prompt, self.adapter, params, sink=self.events.sink(index),
                                                processor=processor))

    def submit(self) -> None:
        if not self.s.engine.alive:
            raise APIError(503, "the generation engine has stopped; see /health", "server_error", code="engine_down")
        try:
            self.s.engine.submit(*self.requests)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from exc
        except RequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code="context_length_exceeded"
                           if exc.param == "max_tokens" else "invalid_value") from exc

    def cancel_unfinished(self) -> None:
        for req in self.requests:
            if req.finish_reason is None:
                self.s.engine.cancel(req)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(r.output_ids) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        """Free the engine slots of unfinished choices and book the tokens used; once."""
        self.cancel_unfinished()
        if not self.closed:
            self.closed = True
            self.record_usage()

    def record_usage(self) -> None:
        u = self.usage()
        self.s.usage.record(self.body.model, self.key_id, u["prompt_tokens"], u["completion_tokens"])
        self.s.metrics.prompt_tokens.inc(u["prompt_tokens"], model=self.body.model)
        self.s.metrics.completion_tokens.inc(u["completion_tokens"], model=self.body.model)

    async def next_event(self, http_request: Request) -> tuple[int, Event]:
        """The next (index, event); cancels everything and raises if the client went away (checked
        every DISCONNECT_POLL_S, events flowing or not)."""
        while True:
            if time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + DISCONNECT_POLL_S
                if await http_request.is_disconnected():
                    self.cancel_unfinished()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.events.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue

    async def complete(self, http_request: Request) -> dict:
        """Wait for every choice, then the whole response body."""
        self.submit()
        done: dict[int, Event] = {}
        try:
            while len(done) < len(self.requests):
                index, event = await self.next_event(http_request)
                if event.kind == "error":
                    _raise_for_event(event)
                if event.kind == "done":
                    done[index] = event
        finally:
            self.close()
        choices = [self._choice(i, done[i]) for i in range(len(self.requests))]
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def _choice(self, index: int, event: Event) -> dict:
        req, tok = self.requests[index], self.s.tokenizer
        entries = trim_to_text(tok, req.output_logprobs, event.text) if self.top_k is not None else []
        if self.kind == "chat":
            message, called = self.plan.message(event.text)
            return {"index": index, "message": message,
                    "logprobs": chat_logprobs(tok, entries) if self.top_k is not None else None,
                    "finish_reason": _finish_reason(called, event.finish_reason)}
        prefix = tok.decode(req.prompt_ids) if self.echo else ""
        logprobs = None
        if self.top_k is not None:
            scored = (req.prompt_logprobs or [None] * len(req.prompt_ids)) if self.echo else []
            tokens = (req.prompt_ids if self.echo else []) + [e.token for e in entries]
            logprobs = completion_logprobs(tok, scored + entries, tokens)
        return {"index": index, "text": prefix + event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}

    # ---- streaming ------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                 "created": self.created, "model": self.body.model, "choices": choices, "system_fingerprint": None}
        if self.body.stream_options and self.body.stream_options.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    def _delta(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
               entries: list | None = None) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            logprobs = chat_logprobs(self.s.tokenizer, entries) if self.top_k is not None and entries else None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": self._stream_logprobs(index, entries),
                "finish_reason": finish}

    def _stream_logprobs(self, index: int, entries: list | None, tokens: list[int] | None = None) -> dict | None:
        """A completion chunk's legacy logprobs, text offsets running on from the choice's last chunk."""
        if self.top_k is None or not (entries or tokens):
            return None
        tokens = tokens if tokens is not None else [e.token for e in entries]
        out = completion_logprobs(self.s.tokenizer, entries, tokens, self.offsets.get(index, 0))
        self.offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1]) if tokens else self.offsets.get(index, 0)
        return out

    def _tool_delta(self, index: int, event: Event, entries: list) -> dict:
        """With tools, a streamed answer comes as one delta: its text, or its tool calls."""
        message, called = self.plan.message(event.text)
        if called:
            delta = {"tool_calls": [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]}
        else:
            delta = {"content": event.text}
        logprobs = chat_logprobs(self.s.tokenizer, entries) if self.top_k is not None and entries else None
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": _finish_reason(called, event.finish_reason)}

    def _echo_chunk(self, index: int) -> str:
        """Streaming with echo: a choice opens with its prompt's text (and log-probs, known once prefilled)."""
        req = self.requests[index]
        entries = req.prompt_logprobs or [None] * len(req.prompt_ids)
        return self._chunk([{"index": index, "text": self.s.tokenizer.decode(req.prompt_ids),
                             "logprobs": self._stream_logprobs(index, entries, req.prompt_ids), "finish_reason": None}])

    async def stream(self, http_request: Request):
        """Server-sent events: a role chunk per choice (chat), text deltas, a finish chunk per choice,
        the usage chunk when asked for, then [DONE]. Ends early (and frees the slots) on disconnect."""
        finished = 0
        try:
            if self.kind == "chat":
                yield self._chunk([self._delta(i, role=True) for i in range(len(self.requests))])
            echoed: set[int] = set()
            pending: dict[int, list] = {}  # with tools: log-probs held until the answer is whole
            while finished < len(self.requests):
                index, event = await self.next_event(http_request)
                if self.echo and index not in echoed and event.kind != "error":
                    echoed.add(index)
                    yield self._echo_chunk(index)
                if event.kind == "delta" and self.plan.tools:
                    pending.setdefault(index, []).extend(event.logprobs)  # a call is whole only at the end
                elif event.kind == "delta":
                    yield self._chunk([self._delta(index, event.text, entries=event.logprobs)])
                elif event.kind == "done":
                    finished += 1
                    if self.plan.tools:
                        yield self._chunk([self._tool_delta(index, event, pending.pop(index, []) + event.logprobs)])
                    else:
                        yield self._chunk([self._delta(index, finish=event.finish_reason, entries=event.logprobs)])
                else:
                    yield f"data: {json.dumps(error_body(event.error or 'generation failed', 'server_error'))}\n\n"
                    break
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.close()


def _finish_reason(called: bool, reason: str | None) -> str | None:
    """OpenAI's "tool_calls" for an answer that ended by itself with tool calls."""
    return "tool_calls" if called and reason == "stop" else reason


class _EventStream(StreamingResponse):
    """The SSE response; however the stream ends (done, client gone, send failed), the generation's
    unfinished choices are cancelled at once, so their batch slots are freed."""

    def __init__(self, generation: _Generator, request: Request):
        super().__init__(generation.stream(request), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def _params(max_tokens, temperature, top_p, stops, seed, ignore_eos, **extra) -> SamplingParams:
    try:
        top_p = max(top_p, FLOAT32_TINY)  # a smaller top_p means the same (the top token) but compares as 0
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops, seed=seed,
                              ignore_eos=ignore_eos, **extra)
    except RequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


# ---- the app -------------------------------------------------------------------------------------
class _State:
    def __init__(self, engine: Engine, registry: AdapterRegistry, api_keys, metrics: Metrics, usage: UsageLedger):
        self.engine, self.registry, self.metrics, self.usage = engine, registry, metrics, usage
        self.keys = KeyRing(api_keys)
        self.roles = {k.id: Caller(k.id, k.role, k.name) for k in self.keys.keys}
        self.adapter_owners = AdapterOwners()
        self.tokenizer = engine.tokenizer
        self.started = int(time.time())
        self.model_guard = None  # (model name, key id) -> may this caller use it? (set by the jobs service)
        self.model_deleter = None  # (model name, key id) -> deleted card, or None when not its model (jobs)
        self.model_error = None  # model name -> why it cannot be served now, or None (set by the jobs service)
        self.body_limits: dict[str, int] = {}  # path prefix -> larger body limit (uploads)
        self.off_loop = OffLoop()  # templating and tokenising: off the event loop, bounded

    def caller_of(self, key_id: str | None) -> Caller:
        return ANONYMOUS if key_id is None else self.roles.get(key_id, Caller(key_id, "user" if self.keys else
                                                                           "operator"))

    def visible(self, name: str, key_id: str | None) -> bool:
        if key_id is not None and not self.adapter_owners.may_use(name, self.caller_of(key_id)):
            return False
        return self.model_guard is None or key_id is None or self.model_guard(name, key_id)

    def resolve_model(self, name: str, key_id: str | None = None) -> str | None:
        """None for the base model, the adapter's name for an adapter; 404 otherwise (also for a model
        that the model guard hides from this caller)."""
        if name == self.registry.base_name:
            return None
        if self.visible(name, key_id):
            if name in self.registry:  # the guard may register it just now
                return name
            problem = self.model_error(name) if self.model_error is not None else None
            if problem:
                raise APIError(503, f"The model '{name}' cannot be served: {problem}", "server_error", "model",
                               "model_unavailable")
        raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")

    def key_id(self, request: Request) -> str:
        """Who is calling: "anonymous" without keys, else a fingerprint of the key (401 if wrong)."""
        return self.who(request).id

    def who(self, request: Request) -> Caller:
        """The Caller of a request: the anonymous operator without keys, else the key's (401 if wrong)."""
        if not self.keys:
            return ANONYMOUS
        found = self.keys.caller(request.headers.get("authorization", ""))
        if found is not None:
            return found
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", param=None,
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_card(self, name: str, created: int | None = None, parent: str | None = None) -> dict:
        card = {"id": name, "object": "model", "created": created or self.started, "owned_by": "qforge"}
        if parent:
            card |= {"parent": parent, "root": parent}
        return card


class _CountRequests:
    """ASGI middleware: requests by route and status, and their latency (a stream's whole length)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, start = 500, time.monotonic()

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.inc(route=route, status=str(status))
            self.metrics.latency.observe(time.monotonic() - start, route=route)


def create_app(engine: Engine, registry: AdapterRegistry, api_keys=(), metrics: Metrics | None = None,
               usage: UsageLedger | None = None, extensions=()) -> FastAPI:
    """The FastAPI app over a (started or not) engine. `api_keys`: accepted bearer keys (none: open).
    `extensions`: callables extend(app, state, caller) that add routes (the jobs service)."""
    metrics = metrics or engine.metrics or Metrics()
    state = _State(engine, registry, api_keys, metrics, usage or UsageLedger())
    app = FastAPI(title="qforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qforge = state
    app.add_middleware(CatchAll)  # innermost: an escaped exception is a 500 and the connection lives on
    app.add_middleware(LimitBody, max_bytes=MAX_BODY_BYTES, overrides=state.body_limits)
    app.add_middleware(_CountRequests, metrics=metrics)
    _install_error_handlers(app)
    engine.start()

    def caller(request: Request) -> str:
        return state.key_id(request)

    _add_info_routes(app, state, caller)
    _add_generation_routes(app, state, caller)
    _add_adapter_routes(app, state, caller)
    _add_model_delete_route(app, state, caller)
    add_embedding_routes(app, state, caller, APIError)
    for extend in extensions:
        extend(app, state, caller)
    return app


def _add_info_routes(app: FastAPI, state: _State, caller) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        ok = state.engine.alive
        body = {"status": "ok" if ok else "error", "queue_depth": state.engine.queue_depth(),
                "running": state.engine.running(), "loaded_adapters": len(state.registry.loaded_names())}
        if not ok:
            body["error"] = f"engine stopped: {state.engine.error!r}"
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics(who: Caller = Depends(state.who)):
        if not who.is_operator:
            raise APIError(403, "/metrics needs an operator key", "permission_error", code="operator_only")
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/usage")
    async def usage(who: Caller = Depends(state.who)):
        return state.usage.snapshot(None if who.is_operator else who.id)

    @app.get("/v1/models")
    async def models(key_id: str = Depends(caller)):
        base = state.registry.base_name
        cards = [state.model_card(base)] + [state.model_card(e.name, e.created, base) for e in state.registry.entries()
                                            if state.visible(e.name, key_id)]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, key_id: str = Depends(caller)):
        adapter = state.resolve_model(model_id, key_id)
        return state.model_card(model_id, parent=None if adapter is None else state.registry.base_name)


def _add_generation_routes(app: FastAPI, state: _State, caller) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request, key_id: str = Depends(caller)):
        body.unsupported()
        _check_request(state, body, len(body.prompt) if isinstance(body.prompt, list) and body.prompt
                       and not isinstance(body.prompt[0], int) else 1)
        plan = body.output_plan()
        prompts = await state.off_loop.run(_completion_prompts, state, body.prompt)
        limit = 16 if body.max_tokens is None else body.max_tokens
        return await _respond(state, "completion", body, prompts, [limit] * len(prompts), key_id, request, plan)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request, key_id: str = Depends(caller)):
        body.unsupported()
        _check_request(state, body, 1)
        plan = body.output_plan()
        template = adapter_chat_template(state, state.resolve_model(body.model, key_id))
        prompt = await state.off_loop.run(_chat_prompt, state, body.messages, plan, template)
        asked = body.max_completion_tokens or body.max_tokens
        limit = asked or max(1, min(DEFAULT_CHAT_MAX_TOKENS, state.engine.context_len - len(prompt)))
        return await _respond(state, "chat", body, [prompt], [limit], key_id, request, plan)


def _check_request(state: "_State", body: _Generation, prompts: int) -> None:
    """What no retry can fix, before any work: text that is not UTF-8, more choices than the queue holds."""
    bad = lone_surrogate(body.model_dump(exclude_none=True))
    if bad:
        raise APIError(400, f"{bad}: the text holds a lone surrogate (not valid Unicode)", param=bad,
                       code="invalid_value")
    choices = prompts * body.n
    if choices > state.engine.max_queue:
        raise APIError(400, f"this request asks for {choices} generations (prompts x n) but the server queues at "
                       f"most {state.engine.max_queue}; send fewer at a time", param="n", code="request_too_large")


async def _respond(state, kind, body, prompts, limits, key_id, request: Request, plan: OutputPlan | None = None):
    grammar = None
    if plan is not None and plan.schema is not None:
        try:  # the first use builds llguidance's view of the tokenizer (about a second): off the event loop
            grammar = await run_in_threadpool(compile_plan, state.engine, plan.schema, plan.schema_param)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc
    generation = _Generator(state, kind, body, prompts, limits, key_id, plan, grammar)
    if body.stream:
        generation.submit()  # errors (400, 429) before the stream starts are plain JSON answers
        return _EventStream(generation, request)
    return JSONResponse(await generation.complete(request))


def _completion_prompts(state: _State, prompt) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    vocab = len(state.tokenizer)
    out = []
    for p in prompt:
        ids = state.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else list(p)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt holds token ids outside [0, {vocab})", param="prompt")
        out.append(ids)
    return out


def adapter_chat_template(state: _State, adapter: str | None) -> str | None:
    """The chat template saved with an adapter's tokenizer files (`qforge train` writes the one it
    trained with beside the adapter), or None: the base tokenizer's template is used."""
    entry = next((e for e in state.registry.entries() if e.name == adapter), None) if adapter else None
    if entry is None or entry.path is None:
        return None
    from ..model.templates import saved_template
    return saved_template(entry.path)


def _chat_prompt(state: _State, messages: list[ChatMessage], plan: OutputPlan | None = None,
                 template: str | None = None) -> list[int]:
    if not template and not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "the base model has no chat template; use /v1/completions", param="messages")
    tools = plan.tools if plan is not None else []
    native = template_supports_tools(state.tokenizer)
    rendered = render_messages([m.as_template_message() for m in messages], tools, native)
    extra = {"tools": tools} if tools and native else {}
    try:
        text = state.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True,
                                                   chat_template=template, **extra)
    except Exception as exc:  # noqa: BLE001 - a template may reject a conversation (role order)
        raise APIError(400, f"the chat template rejects these messages: {exc}", param="messages") from exc
    return state.tokenizer(text, add_special_tokens=False).input_ids


def _add_adapter_routes(app: FastAPI, state: _State, caller) -> None:
    @app.get("/v1/adapters")
    async def list_adapters(key_id: str = Depends(caller)):
        data = [{"id": e.name, "object": "adapter", "loaded": e.loaded, "in_use": e.pins, "created": e.created}
                for e in state.registry.entries() if state.visible(e.name, key_id)]
        return {"object": "list", "data": data, "max_loaded": state.registry.max_loaded}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterBody, who: Caller = Depends(state.who)):
        reason = check_adapter_name(body.name, who, state.keys)
        if reason is not None:
            raise APIError(403, f"cannot register '{body.name}': {reason}", "permission_error", "name",
                           "adapter_name_reserved")
        if body.name in state.registry and not state.visible(body.name, who.id):
            raise APIError(409, f"cannot register '{body.name}': the name is taken", param="name",
                           code="adapter_exists")
        try:
            entry = await run_in_threadpool(state.registry.add, body.name, body.path)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), "invalid_request_error", exc.param, exc.code) from exc
        state.adapter_owners.set(entry.name, None if who.is_operator else who.id)
        return JSONResponse(state.model_card(entry.name, entry.created, state.registry.base_name), 201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, who: Caller = Depends(state.who)):
        if name not in state.registry or not state.visible(name, who.id):
            raise APIError(404, f"no adapter named '{name}'", param="name", code="model_not_found")
        if not state.adapter_owners.may_delete(name, who):
            raise APIError(403, f"adapter '{name}' is not yours to delete (it is the operator's)", "permission_error",
                           "name", "not_owner")
        try:
            await run_in_threadpool(state.registry.remove, name)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), "invalid_request_error", exc.param, exc.code) from exc
        state.adapter_owners.forget(name)
        return {"id": name, "object": "model", "deleted": True}


def _add_model_delete_route(app: FastAPI, state: _State, caller) -> None:
    """DELETE /v1/models/{id}: a fine-tuned model by its owner (the jobs service removes its files),
    or a served adapter (unloaded, as DELETE /v1/adapters/{name}); never the base model (403)."""
    @app.delete("/v1/models/{model_id:path}")
    async def delete_model(model_id: str, key_id: str = Depends(caller)):
        if model_id == state.registry.base_name:
            raise APIError(403, f"the base model '{model_id}' cannot be deleted", "permission_error", param="model",
                           code="model_not_deletable")
        if state.model_deleter is not None:
            done = await run_in_threadpool(state.model_deleter, model_id, key_id)
            if done is not None:
                return done
        if not state.visible(model_id, key_id) or model_id not in state.registry:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        try:
            await run_in_threadpool(state.registry.remove, model_id)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), "invalid_request_error", exc.param, exc.code) from exc
        return {"id": model_id, "object": "model", "deleted": True}
