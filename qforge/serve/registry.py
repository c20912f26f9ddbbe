"""The adapters a server knows, and which of them sit in memory.

Every adapter has a name (the `model` of a request) and, unless it was attached in-process, the
PEFT folder it comes from. At most `max_loaded` sit in the model's adapter slots at once
(qforge.serve.lora_slots); the least recently used one that no running request holds is unloaded to make room, and reloaded from its folder the
next time a request names it. Requests pin their adapter (`acquire` / `release`) while they run, so
an adapter is never detached under a running row.

Security: folders added at run time (`POST /v1/adapters`) must lie inside `adapter_root` after
resolving symlinks and `..`, and so must the two files read from them; without a root, run-time
loading is refused. Folders given on the command line are the operator's and are trusted.

Two locks, so that the API never waits on the model:
  `lock`   guards the slots: the engine holds it for every forward pass, the registry for every
           load and unload (reading a folder included).
  `_book`  guards the table of names only, and is held for a few dictionary operations, never
           across a forward or a read from disk. Listings (`names`, `entries`, `loaded_names`,
           `in`) take only `_book` and return a snapshot, so /health, /v1/models and /v1/adapters
           answer while a long forward runs.

Run-time folders may also be kept out of whole subtrees (`forbid`): the jobs service's data
folder, which holds every key's job folders, is never reachable through --adapter-root.
"""
from __future__ import annotations

import logging
import dataclasses
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters.base_record import BASE_RECORD_NAME, base_mismatch, describe_base, read_base_record
from ..adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, model_layout, read_served_adapter
from ..model.surgery import adapted_layers, detach_adapter
from ..nn import LoraAdapter
from .lora_slots import LoraSlots, unwrap

log = logging.getLogger("qforge.serve")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-:+@]{0,127}$")


class AdapterError(ValueError):
    """An adapter request the client got wrong; `status` is the HTTP status to answer with."""

    status = 400
    code = "invalid_adapter"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AdapterNotFound(AdapterError):
    status, code = 404, "model_not_found"


class AdapterForbidden(AdapterError):
    status, code = 403, "adapter_path_forbidden"


class AdapterConflict(AdapterError):
    status, code = 409, "adapter_exists"


class AdapterUnavailable(AdapterError):
    """A registered adapter that cannot be loaded again (its files were deleted or broken after
    registration): the server's state, not the request's fault; the message names the model only."""
    status, code = 503, "model_unavailable"


class AdapterSlotsBusy(AdapterError):
    """Every adapter slot is held by running requests: a passing state, retry shortly."""
    status, code = 400, "adapter_slots_busy"


@dataclass
class AdapterEntry:
    name: str
    path: Path | None        # None: attached in-process, never evicted
    trusted: bool = True     # False: re-check the path against the root on every load
    source: str = ""         # the path as given, the only form error messages show
    loaded: bool = False
    pins: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    base_warning: str | None = None  # trained on another base than the served one (qforge_base.json)


def model_compute_dtype(model: nn.Module) -> torch.dtype:
    return next((layer.compute_dtype for _, layer in adapted_layers(model)), torch.float32)


class AdapterRegistry:
    """Named adapters over one base model, with an LRU of at most `max_loaded` in memory."""

    def __init__(self, model: nn.Module, base_name: str, max_loaded: int = 16,
                 adapter_root: str | Path | None = None, metrics=None, strict_bases: bool = False):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.model, self.base_name, self.max_loaded = model, base_name, max_loaded
        self.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
        if self.adapter_root is not None and not self.adapter_root.is_dir():
            raise FileNotFoundError(f"adapter root '{adapter_root}' is not a folder")
        self.dtype = model_compute_dtype(model)  # adapters compute in the model's dtype
        self.base_record, self.strict_bases = describe_base(model), strict_bases  # what adapters are checked against
        self.dedicated = None  # whole models served beside the base (qforge.serve.dedicated), set by the app
        self.layout = model_layout(unwrap(model))  # the model's own layout, without serving wrappers
        self.slots = LoraSlots(model, max_loaded, self.dtype)
        self.metrics = metrics
        self.lock = threading.RLock()   # the slots: held across forwards and loads
        self._book = threading.Lock()   # the name table only: never held across a forward or a load
        self._forbidden: list[Path] = []  # subtrees no run-time folder may lie in (the jobs' data folder)
        self._entries: OrderedDict[str, AdapterEntry] = OrderedDict()  # least recently used first
        self._leaving: dict[str, AdapterEntry] = {}  # removed while pinned: detached on last release

    # ---- names ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._book:
            return sorted(self._entries)

    def entries(self) -> list[AdapterEntry]:
        """A snapshot (copies) of the entries, by name; never waits on a forward."""
        with self._book:
            return [dataclasses.replace(self._entries[n]) for n in sorted(self._entries)]

    def entry(self, name: str) -> AdapterEntry | None:
        """A copy of adapter `name`'s entry, or None; never waits on a forward."""
        with self._book:
            found = self._entries.get(name)
            return None if found is None else dataclasses.replace(found)

    def __contains__(self, name: str) -> bool:
        with self._book:
            if name in self._entries:
                return True
        return self.dedicated is not None and name in self.dedicated

    def loaded_names(self) -> list[str]:
        with self._book:
            return [n for n, e in self._entries.items() if e.loaded]

    def _put(self, entry: AdapterEntry) -> None:
        with self._book:
            self._entries[entry.name] = entry

    def _pop(self, name: str) -> AdapterEntry | None:
        with self._book:
            return self._entries.pop(name, None)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise AdapterError(f"invalid adapter name {name!r}: use 1-128 letters, digits and _-:+@, "
                               "starting with a letter or digit", "name")
        if name == self.base_name:
            raise AdapterConflict(f"'{name}' is the base model's name", "name")
        if name in self._entries:
            raise AdapterConflict(f"an adapter named '{name}' is already registered; delete it first", "name")
        if name in self._leaving:
            raise AdapterConflict(f"adapter '{name}' is still being unloaded (requests use it); retry shortly", "name")

    # ---- paths ------------------------------------------------------------------------------
    def forbid(self, folder: str | Path) -> None:
        """Keep run-time adapter folders out of `folder` and everything under it (symlinks resolved),
        even when it lies inside the adapter root: the jobs service's data folder holds every key's
        job folders, which only their owners may serve (as fine-tuned models)."""
        with self._book:
            self._forbidden.append(Path(folder).expanduser().resolve())

    def _refuse_forbidden(self, raw: str, folder: Path) -> None:
        for place in (folder, folder / CONFIG_NAME, folder / WEIGHTS_NAME):
            real = place.resolve()
            if any(real.is_relative_to(f) for f in self._forbidden):
                raise AdapterForbidden(f"adapter path '{raw}' lies in the server's data folder, which holds "
                                       "other keys' jobs; fine-tuned models are served by their names", "path")

    def resolve_path(self, raw: str) -> Path:
        """The folder a run-time request names, resolved inside the adapter root. The error messages
        echo only what the client sent, never where a path really leads."""
        if self.adapter_root is None:
            raise AdapterForbidden("loading adapters at run time is disabled: start the server with --adapter-root",
                                   "path")
        if not isinstance(raw, str) or not raw or "\x00" in raw:
            raise AdapterError("path must be a non-empty string", "path")
        if not _is_text(raw):
            raise AdapterError("path holds a lone surrogate (not valid Unicode)", "path")
        candidate = Path(raw) if Path(raw).is_absolute() else self.adapter_root / raw
        folder = candidate.resolve()
        if not folder.is_relative_to(self.adapter_root):
            raise AdapterForbidden(f"adapter path '{raw}' is outside the adapter root", "path")
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / file_name).resolve().is_relative_to(self.adapter_root):
                raise AdapterForbidden(f"'{raw}/{file_name}' leads outside the adapter root", "path")
        self._refuse_forbidden(raw, folder)
        if not folder.is_dir():
            raise AdapterError(f"no adapter folder at '{raw}'", "path")
        return folder

    # ---- add / remove -----------------------------------------------------------------------
    def add(self, name: str, path: str | Path, trusted: bool = False) -> AdapterEntry:
        """Register adapter `name` from PEFT folder `path` and load it now, so a broken folder is an
        error here rather than in some later request. `trusted` (command-line folders) skips the
        root check."""
        with self.lock:
            self._check_new_name(name)
            folder = Path(path).expanduser().resolve() if trusted else self.resolve_path(str(path))
            entry = AdapterEntry(name, folder, trusted=trusted, source=str(path))
            entry.base_warning = self._check_base(entry)
            self._put(entry)
            try:
                if not self._make_resident(entry, first=True):
                    raise AdapterSlotsBusy(f"all {self.max_loaded} adapter slots are held by running requests; "
                                           "retry shortly", "name")
            except Exception:
                self._pop(name)
                raise
            return entry

    def _check_base(self, entry: AdapterEntry) -> str | None:
        """The adapter's recorded base against the served one: a logged warning (returned, shown in
        /v1/adapters) on a mismatch, an AdapterError naming both with strict_bases."""
        record_path = entry.path / BASE_RECORD_NAME
        if not entry.trusted and not record_path.resolve().is_relative_to(self.adapter_root):
            raise AdapterForbidden(f"'{entry.source}/{BASE_RECORD_NAME}' leads outside the adapter root", "path")
        try:
            mismatch = base_mismatch(read_base_record(entry.path), self.base_record)
        except ValueError as exc:
            raise AdapterError(f"cannot load adapter '{entry.name}': {exc}", "path") from exc
        if mismatch is None:
            return None
        if self.strict_bases:
            raise AdapterError(f"adapter '{entry.name}' was {mismatch} (refused: the server runs with "
                               "--strict-bases)", "path")
        log.warning("adapter '%s' was %s", entry.name, mismatch)
        return f"adapter was {mismatch}"

    def attach(self, name: str) -> AdapterEntry:
        """Register an adapter already attached to the model in-process (never evicted)."""
        with self.lock:
            self._check_new_name(name)
            adapters = self.slots.in_process(name)
            if not adapters:
                raise AdapterNotFound(f"the model carries no adapter named '{name}'")
            entry = AdapterEntry(name, None)
            self._put(entry)
            try:
                if not self._make_resident(entry, adapters):
                    raise AdapterSlotsBusy(f"all {self.max_loaded} adapter slots are held by running requests; "
                                           "retry shortly", "name")
            except Exception:
                self._pop(name)
                raise
            return entry

    def remove(self, name: str) -> None:
        """Forget adapter `name`; its weights leave memory now, or when the last request using it ends."""
        with self.lock:
            entry = self._pop(name)
            if entry is None:
                raise AdapterNotFound(f"no adapter named '{name}'", "name")
            if entry.pins:
                self._leaving[name] = entry
            else:
                self._detach(entry)

    # ---- residency --------------------------------------------------------------------------
    def acquire(self, name: str | None) -> bool:
        """Pin adapter `name` (None: the base) for a request about to run, loading it if evicted.
        False when it cannot be made resident now (every slot pinned); AdapterNotFound when unknown."""
        if name is None:
            return True
        with self.lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFound(f"adapter '{name}' was deleted", "model")
            if not self._make_resident(entry):
                return False
            entry.pins += 1
            with self._book:
                if name in self._entries:
                    self._entries.move_to_end(name)
            return True

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self.lock:
            entry = self._entries.get(name) or self._leaving.get(name)
            if entry is None or entry.pins == 0:
                return
            entry.pins -= 1
            if entry.pins == 0 and name in self._leaving:
                del self._leaving[name]
                self._detach(entry)

    def _make_resident(self, entry: AdapterEntry, in_process: dict[str, LoraAdapter] | None = None,
                       first: bool = False) -> bool:
        """Load `entry` into a slot (evicting the least recently used unpinned one); False when every
        slot is pinned. `first`: at registration, where a bad folder is the client's 400; later (a
        reload after eviction) it is the server's 503, naming the model and no path."""
        if entry.loaded:
            return True
        resident = [e for e in self._entries.values() if e.loaded] + list(self._leaving.values())
        while len(resident) >= self.max_loaded:
            victim = next((e for e in resident if e.pins == 0 and e.path is not None and e is not entry), None)
            if victim is None:
                return False
            self._detach(victim)
            resident.remove(victim)
            self._count("adapter_evictions")
        adapters = in_process if in_process is not None else self._read_or_unavailable(entry, first)
        self.slots.load(entry.name, adapters)
        entry.loaded = True
        self._count("adapter_loads")
        self._update_gauge()
        return True

    def _read_or_unavailable(self, entry: AdapterEntry, first: bool) -> dict[str, LoraAdapter]:
        try:
            return self._read(entry)
        except (AdapterError, OSError) as exc:
            if first:
                raise
            raise AdapterUnavailable(f"The model '{entry.name}' cannot be served now: its adapter files are "
                                     "missing or unreadable (ask the operator)", "model") from exc

    def _read(self, entry: AdapterEntry) -> dict[str, LoraAdapter]:
        """Adapter `entry` from its PEFT folder: layer path -> LoraAdapter (not attached to the model)."""
        folder = entry.path if entry.trusted else self.resolve_path(entry.source)
        try:
            plan, experts = read_served_adapter(self.model, self.layout, folder, entry.name, self.dtype)
        except (FileNotFoundError, ValueError) as exc:
            message = str(exc).replace(str(folder), entry.source)
            if self.adapter_root is not None:
                message = message.replace(str(self.adapter_root), "<adapter-root>")
            raise AdapterError(f"cannot load adapter '{entry.name}': {message}", "path") from exc
        adapters = {}
        with torch.no_grad():
            for path, layer, spec, tensors in plan:
                adapter = LoraAdapter(layer.in_features, layer.out_features, spec).to(layer.weight.device)
                adapter.lora_A.weight.copy_(tensors["lora_A"])
                adapter.lora_B.weight.copy_(tensors["lora_B"])
                for attr in spec.variant.extra_weights:
                    getattr(adapter, attr).copy_(tensors[attr])
                adapters[path] = adapter
        return {**adapters, **experts}  # and the experts modules' LoRAs (MoE)

    def select(self, adapters: list[str | None], device: torch.device):
        """A context in which row b of the model's forward uses adapters[b] (loaded: see acquire)."""
        return self.slots.select(adapters, device)

    def _detach(self, entry: AdapterEntry) -> None:
        if entry.name in self.slots:
            self.slots.unload(entry.name)
        if entry.path is None:  # attached in-process: its weights leave the model too
            detach_adapter(self.model, entry.name)
        entry.loaded = False
        self._update_gauge()

    def _count(self, metric: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).inc()

    def _update_gauge(self) -> None:
        if self.metrics is not None:
            n = sum(e.loaded for e in self._entries.values()) + len(self._leaving)
            self.metrics.loaded_adapters.set(n)


def _is_text(value: str) -> bool:
    """Whether `value` is valid Unicode text (no lone surrogate), as a file name must be."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
