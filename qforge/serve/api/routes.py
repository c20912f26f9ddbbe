"""The routes of the OpenAI-compatible HTTP surface over an Engine and an AdapterRegistry.

Routes: GET /v1/models, GET /v1/models/{id}, DELETE /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions (`stream: true`: server-sent events, streaming.py), POST /v1/embeddings
(embeddings.py), POST /v1/adapters {name, path}, GET /v1/adapters, DELETE /v1/adapters/{name},
GET /v1/usage, GET /metrics (Prometheus text), GET /health.

`create_app` builds the app in-process (tests run it under uvicorn in a thread); it does not own the
engine's thread beyond starting it.
"""
from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..auth import Caller, check_adapter_name
from ..embeddings import add_embedding_routes
from ..engine import Engine
from ..guards import CatchAll, LimitBody, lone_surrogate
from ..metrics import Metrics, UsageLedger
from ..registry import AdapterError, AdapterRegistry
from ..structured import GrammarError, compile_plan
from ..tools import OutputPlan, render_messages, template_supports_tools
from .errors import APIError, install_error_handlers
from .limits import json_depth_over
from .schemas import AdapterBody, ChatBody, ChatMessage, CompletionBody, GenerationBody
from .state import AppState, CountRequests
from .streaming import EventStream, Generation

DEFAULT_CHAT_MAX_TOKENS = 512  # when a chat request gives none: the rest of the context, at most this
MAX_BODY_BYTES = 8 * 2 ** 20


def create_app(engine: Engine, registry: AdapterRegistry, api_keys=(), metrics: Metrics | None = None,
               usage: UsageLedger | None = None, extensions=()) -> FastAPI:
    """The FastAPI app over a (started or not) engine. `api_keys`: accepted bearer keys (none: open).
    `extensions`: callables extend(app, state, caller) that add routes (the jobs service)."""
    metrics = metrics or engine.metrics or Metrics()
    state = AppState(engine, registry, api_keys, metrics, usage or UsageLedger())
    app = FastAPI(title="qforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qforge = state
    app.add_middleware(CatchAll)  # innermost: an escaped exception is a 500 and the connection lives on
    app.add_middleware(LimitBody, max_bytes=MAX_BODY_BYTES, overrides=state.body_limits)
    app.add_middleware(CountRequests, metrics=metrics)
    install_error_handlers(app)
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


def _add_info_routes(app: FastAPI, state: AppState, caller) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """Never waits on a forward: counters and the registry's name table only (its own small lock);
        each health check (the jobs store) runs off the event loop."""
        ok = state.engine.alive
        body = {"status": "ok" if ok else "error", "queue_depth": state.engine.queue_depth(),
                "running": state.engine.running(), "loaded_adapters": len(state.registry.loaded_names())}
        degraded = await state.health.problems(state.health_checks)
        if degraded:
            body["degraded"] = degraded
            body["status"] = body["status"] if not ok else "degraded"
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
        def cards():  # off the event loop: the jobs' model guard reads its database
            base = state.registry.base_name
            found = [state.model_card(base)] + [state.model_card(e.name, e.created, base)
                                                for e in state.registry.entries() if state.visible(e.name, key_id)]
            dedicated = state.registry.dedicated.names() if state.registry.dedicated is not None else []
            return found + [state.model_card(n) for n in dedicated if state.visible(n, key_id)]  # full fine-tunes
        return {"object": "list", "data": await run_in_threadpool(cards)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, key_id: str = Depends(caller)):
        adapter = await run_in_threadpool(state.resolve_model, model_id, key_id)
        return state.model_card(model_id, parent=None if adapter is None else state.registry.base_name)


def _add_generation_routes(app: FastAPI, state: AppState, caller) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request, key_id: str = Depends(caller)):
        body.unsupported()
        _check_request(state, body, len(body.prompt) if isinstance(body.prompt, list) and body.prompt
                       and not isinstance(body.prompt[0], int) else 1)
        plan = body.output_plan()
        adapter = await run_in_threadpool(state.resolve_model, body.model, key_id)
        prompts = await state.off_loop.run(_completion_prompts, state, body.prompt)
        limit = 16 if body.max_tokens is None else body.max_tokens
        state.limits.check_generation([len(p) for p in prompts], [limit] * len(prompts), body.n)
        if body.echo and body.logprobs is not None:
            state.limits.check_scored([len(p) for p in prompts])
        return await _respond(state, "completion", body, prompts, [limit] * len(prompts), key_id, request, plan,
                              adapter)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request, key_id: str = Depends(caller)):
        body.unsupported()
        _check_request(state, body, 1)
        plan = body.output_plan()
        adapter = await run_in_threadpool(state.resolve_model, body.model, key_id)
        template = await run_in_threadpool(adapter_chat_template, state, adapter)
        prompt = await state.off_loop.run(_chat_prompt, state, body.messages, plan, template)
        asked = body.max_completion_tokens or body.max_tokens
        limit = asked or max(1, min(DEFAULT_CHAT_MAX_TOKENS, state.engine.context_len - len(prompt)))
        state.limits.check_generation([len(prompt)], [limit], body.n)
        return await _respond(state, "chat", body, [prompt], [limit], key_id, request, plan, adapter)


def _check_request(state: AppState, body: GenerationBody, prompts: int) -> None:
    """What no retry can fix, before any work: nesting too deep, text that is not UTF-8, more
    choices than the queue holds."""
    check_text(state, body)
    choices = prompts * body.n
    if choices > state.engine.max_queue:
        raise APIError(400, f"this request asks for {choices} generations (prompts x n) but the server queues at "
                       f"most {state.engine.max_queue}; send fewer at a time", param="n", code="request_too_large")


def check_text(state: AppState, body: BaseModel) -> None:
    """400 for a body whose values nest deeper than the limit (checked without recursion, before
    anything walks them recursively) or hold a lone surrogate (text that cannot be UTF-8)."""
    values = dict(body)
    if json_depth_over(values, state.limits.max_json_depth):
        raise APIError(400, f"the request nests JSON values deeper than {state.limits.max_json_depth} levels",
                       code="invalid_value")
    bad = lone_surrogate(body.model_dump(exclude_none=True))
    if bad:
        raise APIError(400, f"{bad}: the text holds a lone surrogate (not valid Unicode)", param=bad,
                       code="invalid_value")


async def _respond(state, kind, body, prompts, limits, key_id, request: Request, plan: OutputPlan | None = None,
                   adapter: str | None = None):
    grammar = None
    if plan is not None and plan.schema is not None:
        try:  # the first use builds llguidance's view of the tokenizer (about a second): off the event loop
            grammar = await run_in_threadpool(compile_plan, state.engine, plan.schema, plan.schema_param)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc
    generation = Generation(state, kind, body, prompts, limits, key_id, plan, grammar, adapter)
    if body.stream:
        generation.submit()  # errors (400, 429) before the stream starts are plain JSON answers
        return EventStream(generation, request)
    return JSONResponse(await generation.complete(request))


def _completion_prompts(state: AppState, prompt) -> list[list[int]]:
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


def adapter_chat_template(state: AppState, adapter: str | None) -> str | None:
    """The chat template saved with an adapter's tokenizer files (`qforge train` writes the one it
    trained with beside the adapter), or None: the base tokenizer's template is used."""
    entry = state.registry.entry(adapter) if adapter else None
    if entry is None or entry.path is None:
        return None
    from ...model.templates import saved_template
    return saved_template(entry.path)


def _chat_prompt(state: AppState, messages: list[ChatMessage], plan: OutputPlan | None = None,
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


def _add_adapter_routes(app: FastAPI, state: AppState, caller) -> None:
    @app.get("/v1/adapters")
    async def list_adapters(key_id: str = Depends(caller)):
        def rows():  # off the event loop: the jobs' model guard reads its database
            return [{"id": e.name, "object": "adapter", "loaded": e.loaded, "in_use": e.pins, "created": e.created,
                     **({"warning": e.base_warning} if e.base_warning else {})}
                    for e in state.registry.entries() if state.visible(e.name, key_id)]
        return {"object": "list", "data": await run_in_threadpool(rows), "max_loaded": state.registry.max_loaded}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterBody, who: Caller = Depends(state.who)):
        check_text(state, body)
        reason = check_adapter_name(body.name, who, state.keys)
        if reason is not None:
            raise APIError(403, f"cannot register '{body.name}': {reason}", "permission_error", "name",
                           "adapter_name_reserved")
        if body.name in state.registry and not await run_in_threadpool(state.visible, body.name, who.id):
            raise APIError(409, f"cannot register '{body.name}': the name is taken", param="name",
                           code="adapter_exists")
        try:
            entry = await run_in_threadpool(state.registry.add, body.name, body.path)
        except AdapterError as exc:
            raise APIError(exc.status, str(exc), "invalid_request_error", exc.param, exc.code) from exc
        state.adapter_owners.set(entry.name, None if who.is_operator else who.id)
        card = state.model_card(entry.name, entry.created, state.registry.base_name)
        return JSONResponse(card | ({"warning": entry.base_warning} if entry.base_warning else {}), 201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, who: Caller = Depends(state.who)):
        await _delete_adapter(state, name, who, "name")
        return {"id": name, "object": "model", "deleted": True}


def _add_model_delete_route(app: FastAPI, state: AppState, caller) -> None:
    """DELETE /v1/models/{id}: a fine-tuned model by its owner (the jobs service removes its files),
    or a served adapter (unloaded, as DELETE /v1/adapters/{name}); never the base model (403)."""
    @app.delete("/v1/models/{model_id:path}")
    async def delete_model(model_id: str, who: Caller = Depends(state.who)):
        if model_id == state.registry.base_name:
            raise APIError(403, f"the base model '{model_id}' cannot be deleted", "permission_error", param="model",
                           code="model_not_deletable")
        if state.model_deleter is not None:
            done = await run_in_threadpool(state.model_deleter, model_id, who.id)
            if done is not None:
                return done
        await _delete_adapter(state, model_id, who, "model")
        return {"id": model_id, "object": "model", "deleted": True}


async def _delete_adapter(state: AppState, name: str, who: Caller, param: str) -> None:
    """Unload a served adapter for its owner: 404 when this caller cannot see it (as for an unknown
    name), 403 when it may use it but not delete it (an operator's adapter). One rule for
    DELETE /v1/adapters/{name} and DELETE /v1/models/{id}."""
    if name not in state.registry or not await run_in_threadpool(state.visible, name, who.id):
        raise APIError(404, f"The model '{name}' does not exist", param=param, code="model_not_found")
    if not state.adapter_owners.may_delete(name, who):
        raise APIError(403, f"adapter '{name}' is not yours to delete (it is the operator's)", "permission_error",
                       param, "not_owner")
    try:
        await run_in_threadpool(state.registry.remove, name)
    except AdapterError as exc:
        raise APIError(exc.status, str(exc), "invalid_request_error", exc.param, exc.code) from exc
    state.adapter_owners.forget(name)
