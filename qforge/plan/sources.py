"""Where the planner finds a model's shape besides a config.json: a GGUF file's metadata, or the
config.json of a Hugging Face Hub model already in the local cache (never downloaded here).

A GGUF file is read with the `gguf` package (llama.cpp's own reader): the `{arch}.*` keys give the
sizes, the tensor list what the keys leave out (tied embeddings: no `output.weight`; biases). The
result is a config.json-style dict, so ModelArch.from_config reads both alike.
"""
from __future__ import annotations

import functools
from pathlib import Path

# llama.cpp architecture name -> transformers model_type, where they differ (for QK_NORM and friends)
GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gptneox": "gpt_neox", "deepseek2": "deepseek_v3",
                    "gemma3": "gemma3_text"}


def _scalar(reader, key: str):
    """The value of a GGUF metadata field: a number, a string, a list for arrays (e.g. per-layer
    head counts), or None when absent."""
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def _first_int(value) -> int | None:
    """An integer field; a per-layer array gives its largest entry (the widest layer)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return int(max(value)) if value else None
    return int(value)


def gguf_config(path: str | Path) -> dict:
    """A config.json-style dict of GGUF file `path`'s architecture (hidden_size, intermediate_size,
    num_hidden_layers, heads, vocab, experts ...). ValueError naming the file and the key when
    the file is not GGUF or lacks a size the planner needs. The reader parses every metadata field,
    the tokenizer's ~100k strings included (seconds on a busy machine), so a file is read once
    per process while its size and modification time stay the same."""
    path = Path(path).resolve()
    stat = path.stat()
    return dict(_gguf_config(path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _gguf_config(path: Path, size: int, mtime_ns: int) -> dict:
    from gguf import GGUFReader, Keys

    del size, mtime_ns  # the cache key only
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors (ValueError, IndexError ...) on a damaged file
        raise ValueError(f"'{path}' is not a readable GGUF file ({exc})") from None
    arch = _scalar(reader, Keys.General.ARCHITECTURE)
    if not arch:
        raise ValueError(f"'{path}': GGUF metadata lacks '{Keys.General.ARCHITECTURE}'")

    def get(key: str):
        return _first_int(_scalar(reader, key.format(arch=arch)))

    tensors = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    tokens = reader.get_field(Keys.Tokenizer.LIST)
    vocab = get(Keys.LLM.VOCAB_SIZE) or (len(tokens.data) if tokens is not None else None) \
        or max(tensors.get("token_embd.weight", [0]))
    config = {
        "model_type": GGUF_MODEL_TYPES.get(arch, arch), "_name_or_path": _scalar(reader, Keys.General.NAME) or path.stem,
        "hidden_size": get(Keys.LLM.EMBEDDING_LENGTH), "num_hidden_layers": get(Keys.LLM.BLOCK_COUNT),
        "intermediate_size": get(Keys.LLM.FEED_FORWARD_LENGTH), "num_attention_heads": get(Keys.Attention.HEAD_COUNT),
        "num_key_value_heads": get(Keys.Attention.HEAD_COUNT_KV), "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_output.bias" in tensors,
    }
    if get(Keys.Attention.KEY_LENGTH):
        config["head_dim"] = get(Keys.Attention.KEY_LENGTH)
    experts = get(Keys.LLM.EXPERT_COUNT)
    if experts:
        config.update(num_experts=experts, num_experts_per_tok=get(Keys.LLM.EXPERT_USED_COUNT) or 2,
                      moe_intermediate_size=get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) or config["intermediate_size"])
        if get(Keys.LLM.EXPERT_SHARED_COUNT):  # DeepSeek: n shared experts of the routed experts' width
            config["n_shared_experts"] = get(Keys.LLM.EXPERT_SHARED_COUNT)
        elif get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH):  # Qwen2-MoE: one shared expert, gated
            config["shared_expert_intermediate_size"] = get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH)
        if get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT) is not None:
            config["first_k_dense_replace"] = get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)
    if get(Keys.Attention.KV_LORA_RANK):  # multi-head latent attention (DeepSeek-V2/V3)
        rope = get(Keys.Rope.DIMENSION_COUNT) or 0
        key_length = get(Keys.Attention.KEY_LENGTH_MLA) or get(Keys.Attention.KEY_LENGTH) or 0
        config.update(kv_lora_rank=get(Keys.Attention.KV_LORA_RANK), q_lora_rank=get(Keys.Attention.Q_LORA_RANK) or 0,
                      qk_rope_head_dim=rope, qk_nope_head_dim=key_length - rope,
                      v_head_dim=get(Keys.Attention.VALUE_LENGTH_MLA) or get(Keys.Attention.VALUE_LENGTH) or 0)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
               if not config.get(k)]
    if missing:
        raise ValueError(f"'{path}': GGUF metadata of architecture '{arch}' gives no {', '.join(missing)} "
                         f"(keys '{arch}.embedding_length', '{arch}.block_count', '{arch}.feed_forward_length', "
                         f"'{arch}.attention.head_count', tokenizer.ggml.tokens)")
    return config


def hub_config_path(repo_id: str, revision: str | None = None) -> Path:
    """config.json of Hub model `repo_id` from the local Hugging Face cache (qforge.model.hub's
    cache folder); never downloads. FileNotFoundError when the cache lacks it."""
    from huggingface_hub import try_to_load_from_cache

    from ..model.hub import hub_cache_dir

    cache = hub_cache_dir()
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache), revision=revision)
    if not isinstance(found, str):
        raise FileNotFoundError(f"model '{repo_id}' has no config.json in the Hugging Face cache ({cache}); the "
                                "planner reads it offline: download the model first (e.g. `hf download "
                                f"{repo_id} config.json`), or give a config.json, a model folder or a .gguf file")
    return Path(found)
