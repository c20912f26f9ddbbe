"""Whole models served beside the base: a full fine-tune (or any dense folder) as a dedicated model.

A full fine-tune changes every weight, so the shared base cannot host it as an adapter. Each one
gets an Engine of its own over its folder, served as stored (quant_type "none", the base's dtype
and device), built on first use and kept while it is among the `max_models` most recently used;
the least recently used idle one is stopped to make room.

    request(model=M) --RoutingEngine.submit--> M dedicated? --yes--> DedicatedModels.engine(M) (adapter None)
                                                           --no---> the base engine (adapter M or None)

The RoutingEngine stands where the API expects the Engine: every other attribute is the base
engine's, so the routes do not know dedicated models exist.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .engine import Engine, QueueFull


class DedicatedModels:
    """Model name -> dense folder; at most `max_models` of them loaded (LRU), each with its Engine."""

    def __init__(self, dtype: torch.dtype, device: torch.device, max_models: int = 2, max_batch: int = 32,
                 max_queue: int = 256):
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.dtype, self.device, self.max_models = dtype, device, max_models
        self.max_batch, self.max_queue = max_batch, max_queue
        self._folders: dict[str, Path] = {}
        self._engines: OrderedDict[str, Engine] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._folders

    def names(self) -> list[str]:
        return sorted(self._folders)

    def add(self, name: str, folder: Path) -> None:
        """Serve the dense model folder `folder` as `name` (loaded on its first request)."""
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"'{folder}' holds no model (no config.json)")
        self._folders[name] = Path(folder)

    def remove(self, name: str) -> None:
        with self._lock:
            self._folders.pop(name, None)
            engine = self._engines.pop(name, None)
        if engine is not None:
            engine.stop()

    def engine(self, name: str) -> Engine:
        """The running engine of model `name`, loading it (and stopping the least recently used idle
        one) if needed. QueueFull when `max_models` are loaded and every one is busy."""
        with self._lock:
            engine = self._engines.get(name)
            if engine is not None:
                self._engines.move_to_end(name)
                return engine
            while len(self._engines) >= self.max_models:
                idle = next((n for n, e in self._engines.items() if not e.queue_depth() and not e.running()), None)
                if idle is None:
                    raise QueueFull(f"all {self.max_models} dedicated models are busy")
                self._engines.pop(idle).stop()
            self._engines[name] = engine = self._load(name)
            return engine

    def _load(self, name: str) -> Engine:
        from ..model.serving import load_serving_model
        from .registry import AdapterRegistry

        model, tokenizer = load_serving_model(str(self._folders[name]), "none", self.dtype, self.device)
        if tokenizer is None:
            raise ValueError(f"model '{name}' has no tokenizer files; the server needs one")
        registry = AdapterRegistry(model, name, max_loaded=1)
        return Engine(model, tokenizer, registry, max_batch=self.max_batch, max_queue=self.max_queue).start()

    def stop(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), OrderedDict()
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
        if adapter is not None and adapter in self.dedicated:
            return self.dedicated.engine(adapter).embed(prompts, None)
        return self.base.embed(prompts, adapter)

    def stop(self, timeout: float = 30.0) -> None:
        self.dedicated.stop()
        self.base.stop(timeout)
