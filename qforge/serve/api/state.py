"""What every route of one app shares: the engine, the registry, the keys and who owns what.

`AppState` answers "who is calling" (a key's Caller, 401 when wrong) and "which model does this
name mean for this caller" (None for the base, the adapter's name, 404 or 503 otherwise); the jobs
service hooks its model guard, deleter and error into it. `CountRequests` is the ASGI middleware
behind the request and latency metrics.
"""
from __future__ import annotations

import time

from fastapi import Request

from ..auth import ANONYMOUS, AdapterOwners, Caller, KeyRing
from ..engine import Engine
from ..guards import OffLoop
from ..metrics import Metrics, UsageLedger
from ..registry import AdapterRegistry
from .errors import APIError
from .health import HealthProbes
from .limits import RequestLimits


class AppState:
    """The shared state of one app (app.state.qforge): engine, registry, keys, usage, adapter owners."""

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
        # name -> check() giving why a part of the service is degraded, or None (the jobs store)
        self.health_checks: dict[str, object] = {}
        self.health = HealthProbes()
        self.limits = RequestLimits()
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


class CountRequests:
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

