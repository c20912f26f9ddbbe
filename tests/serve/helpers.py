"""Shared builders for the serving tests: the SmolLM2 tokenizer, a tiny random 4-bit Llama that uses
it, random non-zero adapters saved in PEFT format, and a live uvicorn server on loopback."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

from qforge.model.surgery import (adapted_layers, add_adapter, detach_adapter, linear_names, quantize_linears,
                                  select_targets, set_active_adapter)
from qforge.nn import LoraSpec

_TOKENIZER = None


def smollm2_tokenizer():
    """The embedded model's tokenizer (ChatML template), read from its GGUF file once per process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        from qforge.model.embedded import smollm2_gguf_path

        path = smollm2_gguf_path()
        _TOKENIZER = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _TOKENIZER


def tiny_llama(tokenizer, dtype=torch.float32, seed: int = 0, context: int = 256, layers: int = 2):
    """A random Llama (hidden 64) over the tokenizer's vocabulary, every linear but lm_head in NF4.
    A wide initialisation keeps its logits peaked, so greedy choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    quantize_linears(model, select_targets(linear_names(model), "all-linear"), compute_dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def random_adapter(model, name: str, seed: int, r: int = 4, dtype=torch.float32, scale: float = 0.3) -> None:
    """Attach adapter `name` with random A and random non-zero B (so it changes the output)."""
    add_adapter(model, name, LoraSpec(r=r, alpha=2 * r, dropout=0.0, dtype=dtype))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            adapters = getattr(module, "adapters", None)
            if adapters is not None and name in adapters:
                a = adapters[name]
                a.lora_A.weight.copy_(torch.randn(a.lora_A.weight.shape, generator=gen) * scale)
                a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=gen) * scale)
    set_active_adapter(model, None)


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
