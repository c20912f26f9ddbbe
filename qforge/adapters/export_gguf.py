"""The way out to llama.cpp and Ollama: a merged Llama-architecture model, or an adapter alone, as GGUF.

    merged float32 weights (adapters/merge.py: dequant(W) + s B A, one layer at a time)
        |  Hugging Face name -> llama.cpp name        model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight
        |  Q and K rows permuted for llama.cpp's rotary layout (adjacent pairs, not halves)
        |  quantised per tensor: f32 | f16 | q8_0 | q4_k_m (Q4_K, with Q6_K for the output layer and
        |  for attn_v / ffn_down in llama.cpp's "more bits" layers; rows not a multiple of 256 fall
        |  back as llama.cpp's quantizer does: Q4_K -> Q5_0, Q6_K -> Q8_0)
        v
    model.gguf  (gguf.GGUFWriter: llama.* hyper-parameters, tokenizer.* with the chat template)

The file format is written by the `gguf` package (llama.cpp's own Python writer); Q8_0 and Q5_0
use its quantisers, Q4_K and Q6_K ours (qforge/quant/kquants.py, checked against its dequantiser).

A LoRA GGUF (llama.cpp's `--lora`) holds general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and per adapted weight `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r],
lora_b's rows permuted like the weight's for Q and K; llama.cpp scales B A by alpha / r.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..fileio import fsync_dir
from ..model.templates import end_of_turn_id, with_end_of_turn
from ..quant.kquants import quantize_q4_k, quantize_q6_k

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
LORA_QUANTS = ("f32", "f16")
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SKIPPED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class LlamaDims:
    """What the GGUF header and the Q/K permutation need from a transformers Llama config."""
    n_layer: int
    hidden: int
    ffn: int
    n_head: int
    n_kv_head: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    vocab: int

    @classmethod
    def from_config(cls, config) -> "LlamaDims":
        arch = (getattr(config, "architectures", None) or [None])[0]
        if getattr(config, "model_type", None) != "llama":
            raise ValueError(f"GGUF export supports the Llama architecture only; this model is "
                             f"model_type={getattr(config, 'model_type', None)!r} ({arch})")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"GGUF export: rope_type {rope.get('rope_type')!r} is not supported (only plain RoPE)")
        theta = getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0)
        heads = config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads,
                   config.max_position_embeddings, float(theta), float(config.rms_norm_eps), config.vocab_size)


def gguf_name(hf_key: str) -> str | None:
    """llama.cpp's tensor name for a transformers Llama state-dict key; None for buffers it does not
    store; ValueError for a key it has no place for."""
    if hf_key in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_key]
    if _SKIPPED.match(hf_key):
        return None
    m = _LAYER_KEY.match(hf_key)
    if m is None or m[2] not in _LAYER_NAMES:
        raise ValueError(f"GGUF export: no llama.cpp tensor for '{hf_key}'")
    return f"blk.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection (or bias) from transformers' rotary layout (each head's
    first half pairs with its second half) to llama.cpp's (adjacent rows pair up)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int):
    """The GGML type a tensor gets in a `quant` file (llama.cpp's choices for Q4_K_M)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or quant == "f32":
        return T.F32
    if quant == "f16":
        return T.F16
    cols = shape[-1]
    if quant == "q8_0":
        return T.Q8_0 if cols % 32 == 0 else T.F16
    more_bits = name == "output.weight" or (
        name.endswith((".attn_v.weight", ".ffn_down.weight")) and _layer_more_bits(int(name.split(".")[1]), n_layer))
    if cols % 256 == 0:
        return T.Q6_K if more_bits else T.Q4_K
    if cols % 32 == 0:
        return T.Q8_0 if more_bits else T.Q5_0
    return T.F16


def encode(array: np.ndarray, qtype) -> np.ndarray:
    """float32 [rows, cols] -> what GGUFWriter.add_tensor takes for `qtype` (floats or block bytes)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F32:
        return array
    if qtype == T.F16:
        return array.astype(np.float16)
    if qtype == T.Q4_K:
        return quantize_q4_k(array)
    if qtype == T.Q6_K:
        return quantize_q6_k(array)
    return quantize(array, qtype)


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType as F
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_k_m": F.MOSTLY_Q4_K_M}[quant]


# ---- tokenizer ------------------------------------------------------------------------------
def tokenizer_fields_from_gguf(path: str | Path) -> list[tuple[str, object, list]]:
    """Every tokenizer.* key of an existing GGUF file as (key, value, [value type, sub type])."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return [(k, f.contents(), list(f.types)) for k, f in reader.fields.items() if k.startswith("tokenizer.")]


def _add_tokenizer_from_gguf(writer, fields) -> None:
    import gguf
    for key, value, types in fields:
        sub = types[1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, types[0], sub_type=sub)


def _add_tokenizer_from_hf(writer, tokenizer, n_vocab: int, pre: str, chat_template: str | None = None) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" model, with its merges,
    special tokens and chat template (`chat_template` when given; its end of turn as eos for the
    families that do that); padded with unused tokens up to the model's vocabulary."""
    import copy

    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    if chat_template:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = chat_template
    tokenizer, _ = with_end_of_turn(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError, TypeError, KeyError) as exc:
            raise ValueError("GGUF export: the tokenizer is not a byte-level BPE tokenizer.json (what llama.cpp "
                             f"calls 'gpt2'); SentencePiece tokenizers are not supported here ({exc})") from exc
        tokens, types = [], []
        for text, _score, toktype in vocab.all_tokens():
            tokens.append(text)
            types.append(toktype)
        if len(tokens) > n_vocab:
            raise ValueError(f"GGUF export: the tokenizer has {len(tokens)} tokens, the model {n_vocab}")
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = SpecialVocab(Path(tmp), load_merges=True, n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
        if not special.chat_template and getattr(tokenizer, "chat_template", None):
            writer.add_chat_template(tokenizer.chat_template)


# ---- writing --------------------------------------------------------------------------------
def _write_atomically(out: Path, fill) -> Path:
    """Create GGUFWriter on a temporary sibling, let `fill(writer)` add everything, write, rename."""
    import gguf

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _add_header(writer, dims: LlamaDims, name: str, quant: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(dims.context)
    writer.add_embedding_length(dims.hidden)
    writer.add_block_count(dims.n_layer)
    writer.add_feed_forward_length(dims.ffn)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_kv_head)
    writer.add_rope_freq_base(dims.rope_theta)
    writer.add_layer_norm_rms_eps(dims.rms_eps)
    writer.add_rope_dimension_count(dims.head_dim)
    writer.add_vocab_size(dims.vocab)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gguf_tensor(hf_key: str, t: torch.Tensor, dims: LlamaDims) -> tuple[str, np.ndarray] | None:
    name = gguf_name(hf_key)
    if name is None:
        return None
    array = t.detach().float().cpu().numpy()
    if ".attn_q." in name:
        array = rope_permute(array, dims.n_head)
    elif ".attn_k." in name:
        array = rope_permute(array, dims.n_kv_head)
    return name, array


def write_gguf(out: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], config, tokenizer=None,
               quant: str = "f16", name: str = "model", tokenizer_gguf: str | Path | None = None,
               tokenizer_pre: str = "default", chat_template: str | None = None) -> Path:
    """Write a llama.cpp GGUF of a Llama model from (transformers key, tensor) pairs, consumed one at a
    time and held only in their encoded form. The tokenizer comes from `tokenizer_gguf` (copy an
    existing GGUF's tokenizer.* keys: exact for a model that came from GGUF) or from `tokenizer`.
    `chat_template` (the one the adapter was trained with) replaces the tokenizer's; its end of turn
    becomes `tokenizer.ggml.eot_token_id`, which llama.cpp stops on (needs `tokenizer` for the id)."""
    if quant not in QUANTS:
        raise ValueError(f"GGUF export: quant must be one of {QUANTS}, got {quant!r}")
    dims = LlamaDims.from_config(config)
    encoded = []
    for key, t in tensors:
        item = _gguf_tensor(key, t, dims)
        if item is not None:
            gname, array = item
            qtype = tensor_type(gname, array.shape, quant, dims.n_layer)
            encoded.append((gname, encode(array, qtype), qtype))
    tok_fields = tokenizer_fields_from_gguf(tokenizer_gguf) if tokenizer_gguf else None
    template = chat_template or getattr(tokenizer, "chat_template", None)
    eot = end_of_turn_id(tokenizer, template) if tokenizer is not None else None
    if tok_fields is not None and chat_template:
        tok_fields = [f for f in tok_fields if f[0] != "tokenizer.chat_template"]
    if eot is not None and tok_fields is not None:
        tok_fields = [f for f in tok_fields if f[0] != "tokenizer.ggml.eot_token_id"]

    def fill(writer) -> None:
        _add_header(writer, dims, name, quant)
        if tok_fields is not None:
            _add_tokenizer_from_gguf(writer, tok_fields)
            if chat_template:
                writer.add_chat_template(chat_template)
        elif tokenizer is not None:
            _add_tokenizer_from_hf(writer, tokenizer, dims.vocab, tokenizer_pre, chat_template)
        if eot is not None:
            writer.add_eot_token_id(eot)
        for gname, data, qtype in encoded:
            writer.add_tensor(gname, data, raw_dtype=qtype)

    return _write_atomically(Path(out), fill)


def merged_tensors(model: torch.nn.Module, name: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers key, float32 tensor) of `model` with adapter `name` merged, one layer at a time
    (merge.py's streaming merge); tied weights once."""
    from .merge import other_tensors, merged_linears

    yield from other_tensors(model, torch.float32).items()
    for module, layer, w in merged_linears(model, name):
        yield f"{module}.weight", w
        if layer.bias is not None:
            yield f"{module}.bias", layer.bias.detach().float()


def export_merged_gguf(model: torch.nn.Module, tokenizer, out: str | Path, name: str = "default",
                       quant: str = "f16", model_name: str | None = None, tokenizer_gguf: str | Path | None = None,
                       tokenizer_pre: str = "default", chat_template: str | None = None) -> Path:
    """Merge adapter `name` into `model` (a QLoRA model from qforge.model.load) and write it as GGUF
    (`chat_template`: the adapter's, with its end of turn; see write_gguf)."""
    return write_gguf(out, merged_tensors(model, name), model.config, tokenizer, quant,
                      model_name or name, tokenizer_gguf, tokenizer_pre, chat_template)


# ---- the adapter alone ----------------------------------------------------------------------
def _pattern(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def write_lora_gguf(out: str | Path, adapter_config: dict, adapter_tensors: dict[str, dict[str, torch.Tensor]],
                    config, quant: str = "f16", name: str = "adapter") -> Path:
    """An adapter folder's weights (read_adapter_config / read_adapter_tensors) as a llama.cpp LoRA GGUF.

    llama.cpp holds one alpha per file and scales B A by alpha / r; a layer whose scaling differs
    (rank_pattern / alpha_pattern, rsLoRA's alpha / sqrt(r)) has its B multiplied by the ratio."""
    import gguf

    if quant not in LORA_QUANTS:
        raise ValueError(f"LoRA GGUF: quant must be one of {LORA_QUANTS}, got {quant!r}")
    if adapter_config.get("use_dora"):
        raise ValueError("LoRA GGUF: DoRA adapters have no llama.cpp LoRA form; export the merged model "
                         "(--format gguf) instead")
    dims = LlamaDims.from_config(config)
    r0, alpha0 = adapter_config["r"], adapter_config["lora_alpha"]
    scale0 = alpha0 / (r0 ** 0.5 if adapter_config.get("use_rslora") else r0)
    qtype = gguf.GGMLQuantizationType.F32 if quant == "f32" else gguf.GGMLQuantizationType.F16
    encoded = []
    for module, parts in sorted(adapter_tensors.items()):
        r = _pattern(adapter_config.get("rank_pattern"), module, r0)
        alpha = _pattern(adapter_config.get("alpha_pattern"), module, alpha0)
        scale = alpha / (r ** 0.5 if adapter_config.get("use_rslora") else r)
        a = parts["lora_A"].float().numpy()
        gname, b = _gguf_tensor(f"{module}.weight", parts["lora_B"], dims)
        # llama.cpp computes (alpha0 / r) * B A for this layer: fold the rest of our scaling into B
        b = b * (scale / (alpha0 / r))
        encoded.append((f"{gname}.lora_a", encode(a, qtype)))
        encoded.append((f"{gname}.lora_b", encode(b, qtype)))

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha0))
        for gname, data in encoded:
            writer.add_tensor(gname, data, raw_dtype=qtype)

    return _write_atomically(Path(out), fill)
