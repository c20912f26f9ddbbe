"""Whole models served beside the base: a full fine-tune (or any dense folder) as a dedicated model.

A full fine-tune changes every weight, so the shared base cannot host it as an adapter. Each one
gets an Engine of its own over its folder, served as stored (quant_type "none", the base's dtype
and device), loaded in the background when it is registered (or on its first request) and kept
while it is among the `max_models` most recently used; the least recently used idle one is
stopped to make room. A request that arrives while its model loads gets a 429 (retry shortly).

    request(model=M) --RoutingEngine.submit--> M dedicated? --yes--> DedicatedModels.engine(M) (adapter None)
                                                           --no---> the base engine (adapter M or None)

The RoutingEngine stands where the API expects the Engine: every other attribute is the base
engine's, so the routes do not know dedicated models exist.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .engine import Engine, QueueFull, RequestError

log = logging.getLogger("qforge.serve")


class DedicatedModels:
    """Model name -> dense folder; at most `max_models` of them loaded (LRU), each with its Engine.
    Loading runs in a thread of its own (never on the caller's: the API's event loop must not wait
    minutes for a model): a request for a model not loaded starts its load and is answered
    QueueFull ("retry shortly"), as a busy server is."""

    def __init__(self, dtype: torch.dtype, device: torch.device, max_models: int = 2, max_batch: int = 32,
                 max_queue: int = 256):
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.dtype, self.device, self.max_models = dtype, device, max_models
        self.max_batch, self.max_queue = max_batch, max_queue
        self._folders: dict[str, Path] = {}
        self._engines: OrderedDict[str, Engine] = OrderedDict()  # least recently used first
        self._loading: dict[str, threading.Thread] = {}
        self._errors: dict[str, str] = {}  # name -> why its last load failed
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._folders

    def names(self) -> list[str]:
        return sorted(self._folders)

    def add(self, name: str, folder: Path, preload: bool = True) -> None:
        """Serve the dense model folder `folder` as `name`; its load starts now with `preload`
        (when a slot is free or idle), else on its first request."""
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"'{folder}' holds no model (no config.json)")
        self._folders[name] = Path(folder)
        if preload:
            with contextlib.suppress(QueueFull):
                self._start_load(name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._folders.pop(name, None)
            self._errors.pop(name, None)
            engine = self._engines.pop(name, None)
        if engine is not None:
            engine.stop()

    def engine(self, name: str) -> Engine:
        """The running engine of model `name`. Not loaded: its load starts (making room by stopping
        the least recently used idle model) and QueueFull says to retry; RequestError when its
        last load failed."""
        with self._lock:
            engine = self._engines.get(name)
            if engine is not None:
                self._engines.move_to_end(name)
                return engine
            if name in self._errors:
                raise RequestError(f"model '{name}' cannot be served: {self._errors[name]}", "model")
        self._start_load(name)
        raise QueueFull(f"model '{name}' is being loaded; retry in a few seconds")

    def wait_loaded(self, name: str, timeout: float | None = None) -> Engine:
        """engine(name), waiting for its load (for callers off the event loop)."""
        try:
            return self.engine(name)
        except QueueFull:
            thread = self._loading.get(name)
            if thread is not None:
                thread.join(timeout)
            return self.engine(name)

    def _start_load(self, name: str) -> None:
        with self._lock:
            if name in self._engines or name in self._loading:
                return
            while len(self._engines) + len(self._loading) >= self.max_models:
                idle = next((n for n, e in self._engines.items() if not e.queue_depth() and not e.running()), None)
                if idle is None:
                    raise QueueFull(f"all {self.max_models} dedicated models are busy or loading")
                self._engines.pop(idle).stop()
            thread = threading.Thread(target=self._load_into, args=(name,), name=f"qforge-load-{name}", daemon=True)
            self._loading[name] = thread
        thread.start()

    def _load_into(self, name: str) -> None:
        try:
            engine = self._load(name)
        except Exception as exc:  # noqa: BLE001 - the reason is what requests for it get
            log.warning("cannot load dedicated model '%s': %s", name, exc)
            with self._lock:
                if name in self._folders:  # not when removed while it loaded (its files may be what went)
                    self._errors[name] = str(exc)
                self._loading.pop(name, None)
            return
        with self._lock:
            self._loading.pop(name, None)
            if name in self._folders:
                self._engines[name] = engine
                return
        engine.stop()  # removed while it loaded

    def _load(self, name: str) -> Engine:
        from ..model.serving import load_serving_model
        from .registry import AdapterRegistry

        model, tokenizer = load_serving_model(str(self._folders[name]), "none", self.dtype, self.device)
        if tokenizer is None:
            raise ValueError("its folder has no tokenizer files")
        registry = AdapterRegistry(model, name, max_loaded=1)
        return Engine(model, tokenizer, registry, max_batch=self.max_batch, max_queue=self.max_queue).start()

    def stop(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), OrderedDict()
            self._folders.clear()  # a load still running stops its engine when it ends
        for engine in engines:
            engine.stop()


class RoutingEngine:
    """The base Engine as the API sees it, except that requests naming a dedicated model run on
    that model's engine (as its base: adapter None)."""

    def __init__(self, base: Engine, dedicated: DedicatedModels):
        self.base, self.dedicated = base, dedicated

    def __getattr__(self, name):  # everything else is the base engine's
        return getattr(self.base, name)

    def _route(self, req) -> Engine:
        if req.adapter is not None and req.adapter in self.dedicated:
            req.routed_engine = self.dedicated.engine(req.adapter)
            req.adapter = None
        return getattr(req, "routed_engine", self.base)

    def submit(self, *requests) -> None:
        groups: dict[int, tuple[Engine, list]] = {}
        for req in requests:
            engine = self._route(req)
            groups.setdefault(id(engine), (engine, []))[1].append(req)
        for engine, reqs in groups.values():
            engine.submit(*reqs)

    def cancel(self, req) -> None:
        getattr(req, "routed_engine", self.base).cancel(req)

    def embed(self, prompts: list[list[int]], adapter: str | None) -> torch.Tensor:
        if adapter is not None and adapter in self.dedicated:  # called off the event loop: may wait
            from .registry import AdapterError
            try:
                engine = self.dedicated.wait_loaded(adapter, timeout=600)
            except RequestError as exc:  # its load failed: the embeddings route answers AdapterErrors
                raise AdapterError(str(exc), "model") from exc
            return engine.embed(prompts, None)
        return self.base.embed(prompts, adapter)

    def stop(self, timeout: float = 30.0) -> None:
        self.dedicated.stop()
        self.base.stop(timeout)
