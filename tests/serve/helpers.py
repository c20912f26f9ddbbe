"""Shared helpers for the serving tests: random non-zero adapters saved in PEFT format, requests run
alone (the oracle of a mixed batch) and a live uvicorn server on loopback. The tiny models and the
SmolLM2 tokenizer come from tests/fixtures.py."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

from qforge.model.surgery import adapted_layers, add_adapter, detach_adapter, set_active_adapter
from qforge.nn import LoraSpec
# The builders live in tests/fixtures.py; the serving tests know them by these names.
from tests.fixtures import random_lora as random_adapter  # noqa: F401
from tests.fixtures import smollm2_tokenizer  # noqa: F401
from tests.fixtures import tiny_served_llama as tiny_llama  # noqa: F401

SAVED: dict[tuple[int, str], Path] = {}  # (id(model), adapter name) -> its folder, for the oracle


def remember_folder(model, name: str, folder: Path) -> None:
    """Let greedy_alone find adapter `name` of `model` by its folder when it is not attached in-process."""
    SAVED[id(model), name] = Path(folder)


def save_random_adapters(model, root: Path, names: list[str], seed: int = 100) -> dict[str, Path]:
    """Write one random PEFT adapter folder per name under root; the model is left without them."""
    import copy

    from qforge.adapters import save_adapter
    from qforge.serve.lora_slots import SlotLinear, unwrap

    served = any(isinstance(m, SlotLinear) for m in model.modules())
    work = unwrap(copy.deepcopy(model)) if served else model  # a served model's layers are wrapped: use a copy
    paths = {}
    for i, name in enumerate(names):
        random_adapter(work, name, seed + i)
        paths[name] = save_adapter(work, root / name, name=name)
        remember_folder(model, name, paths[name])
        detach_adapter(work, name)
    return paths


def saved_random_adapter(model, root: Path, name: str, seed: int, scale: float = 0.2, r: int = 8,
                         targets=("q_proj", "v_proj", "down_proj"), keep: bool = False, **save_kwargs) -> Path:
    """Attach adapter `name` (random non-zero B) to the layers `targets` names, save it as a PEFT
    folder root/name, and detach it again unless `keep`; no adapter is left active."""
    from qforge.adapters import save_adapter

    add_adapter(model, name, LoraSpec(r=r, alpha=2 * r, dropout=0.0, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                b = layer.adapters[name].lora_B.weight
                b.copy_(torch.randn(b.shape, generator=gen) * scale)
    folder = save_adapter(model, root / name, name=name, **save_kwargs)
    remember_folder(model, name, folder)
    if not keep:
        detach_adapter(model, name)
    set_active_adapter(model, None)
    return folder


_ORACLES: dict[tuple[int, str], object] = {}


def alone_model(model, adapter: str | None):
    """`model` itself when `adapter` is None or attached in-process; else an unwrapped copy of it
    with the adapter's folder loaded in-process: the server's slots play no part in the oracle."""
    import copy

    from qforge.adapters import load_adapter
    from qforge.serve.lora_slots import unwrap

    if adapter is None or any(adapter in layer.adapters for _, layer in adapted_layers(model)):
        return model
    key = (id(model), adapter, SAVED[id(model), adapter])
    if key not in _ORACLES:
        oracle = unwrap(copy.deepcopy(model))
        load_adapter(oracle, key[2], name=adapter, dtype=next(
            layer.compute_dtype for _, layer in adapted_layers(oracle)))
        _ORACLES[key] = oracle
    return _ORACLES[key]


@torch.no_grad()
def greedy_alone(model, prompt_ids: list[int], adapter: str | None, max_tokens: int, stop_ids=()) -> list[int]:
    """The oracle: greedy decoding of one prompt, batch 1, the adapter made active (no per-row
    index), with transformers' own cache handling."""
    from transformers import DynamicCache

    model = alone_model(model, adapter)
    set_active_adapter(model, adapter)
    try:
        device = next(model.parameters()).device
        cache, ids, out = DynamicCache(config=model.config), torch.tensor([prompt_ids], device=device), []
        for _ in range(max_tokens):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].float()
            token = int(logits.argmax())
            out.append(token)
            if token in stop_ids:
                break
            ids = torch.tensor([[token]], device=device)
        return out
    finally:
        set_active_adapter(model, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread; `url` is the /v1 base URL."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
