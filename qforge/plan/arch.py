"""Reading architectures: the shape of a decoder-only transformer and its parameter tensors.

`load_arch` finds a config (a shipped name in qforge/data/archs, a config.json or its folder, a
.gguf file's metadata, a Hub id in the local cache); `ModelArch.from_config` reads its shape, the
model type filling in what config.json does not say; `model_weights` lists every parameter tensor
(with the matrices LoRA adapts) and the parameter counts follow from it. The memory model
(memory.py) prices these tensors; nothing here knows about bytes.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ARCH_DIR = Path(__file__).resolve().parent.parent / "data" / "archs"
ALIASES = {"smollm2-135m": "smollm2", "mistral-7b-v0.1": "mistral-7b", "mistral-7b-v0.3": "mistral-7b",
           "mistral-nemo": "mistral-nemo-12b", "mistral-nemo-base-2407": "mistral-nemo-12b"}
# the words a Hub name adds to a family's name (and a release's -vN.N): Meta-Llama-3.1-8B-Instruct is
# llama-3.1-8b
NAME_PREFIXES, NAME_SUFFIXES = ("meta-",), ("-instruct", "-it", "-chat", "-hf", "-base")


@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder-only transformer, read from a Hugging Face config.json.

    Covers Llama-style models (Llama, Mistral, Qwen2/3, Yi, SmolLM): grouped-query attention with
    q/k/v/o projections, a gated (SwiGLU) MLP gate/up/down, RMSNorm before attention and MLP;
    and mixture-of-experts models: `num_experts` gated MLPs per MoE layer (each of
    `intermediate_size`), of which `experts_per_token` run for each token, chosen by a linear
    router (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3), plus, where the model has them:
      shared_expert_size   summed width of the always-on shared experts of an MoE layer
                           (Qwen2-MoE's shared_expert_intermediate_size, DeepSeek's
                           n_shared_experts * moe_intermediate_size); shared_expert_gate: Qwen2-MoE's
                           [1, H] sigmoid gate on it
      dense_layers         layers with a plain MLP of dense_intermediate_size (DeepSeek's
                           first_k_dense_replace, Qwen-MoE's mlp_only_layers / decoder_sparse_step)
      q_lora_rank, kv_lora_rank, qk_rope_head_dim, v_head_dim   multi-head latent attention
                           (DeepSeek-V2/V3): q and kv through low-rank projections; head_dim is
                           then the query/key head size (nope + rope)
      qk_norm              "head" (Qwen3, Gemma 3: RMSNorm over each head of q and k) or "full"
                           (OLMo 2, OLMoE: over all of q and of k)
      qkv_bias             biases on q, k and v only (Qwen2, Qwen2-MoE); attention_bias: on all four
      norms_per_layer      4 for Gemma 2/3 (norms after attention and MLP too), else 2
      logit_softcap        the head's logits are soft-capped (final_logit_softcapping: Gemma 2)
    """
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 0  # 0: a dense MLP
    experts_per_token: int = 0
    attention_bias: bool = False
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    dense_layers: int = 0
    dense_intermediate_size: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    qk_norm: str = ""
    qkv_bias: bool = False
    norms_per_layer: int = 2
    logit_softcap: bool = False  # Gemma 2's final_logit_softcapping: the loss's logits go through tanh
    stored_float32: bool = False  # config dtype float32: a float32 residual reads the embeddings so

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        if self.kv_lora_rank:  # MLA: the keys and values kv_b_proj expands from the latent
            return self.num_heads * (self.head_dim + self.v_head_dim) // 2  # the mean of k's and v's widths
        return self.num_kv_heads * self.head_dim

    @property
    def o_dim(self) -> int:
        """Width of the attention output (o_proj's input)."""
        return self.num_heads * (self.v_head_dim or self.head_dim)

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.dense_layers if self.num_experts else 0

    @property
    def active_intermediate(self) -> int:
        """MLP width one token runs through: intermediate_size, for MoE times experts_per_token
        plus the shared experts' width."""
        if not self.num_experts:
            return self.intermediate_size
        return self.intermediate_size * self.experts_per_token + self.shared_expert_size

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> ModelArch:
        """Read the fields of a config.json dict; ValueError naming any required field missing.

        A multimodal config's `text_config` is used when the top level has no hidden_size.
        """
        if not isinstance(config, dict):
            raise ValueError(f"config of {name or 'the model'} is not a JSON object")
        config = config.get("text_config", config) if "hidden_size" not in config else config
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if not config.get(k)]
        if missing:
            raise ValueError(f"config of {name or 'the model'} lacks {', '.join(missing)}: "
                             "a Llama- or Mixtral-style config.json is needed")
        heads = int(config["num_attention_heads"])
        experts = int(config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
                      or 0)
        expert_width = config.get("moe_intermediate_size") if experts else None  # Qwen-MoE / DeepSeek names
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        if config.get("kv_lora_rank"):  # MLA: a query/key head is its nope part plus its rope part
            head_dim = int(config.get("qk_nope_head_dim") or 0) + int(config.get("qk_rope_head_dim") or 0)
        return cls(
            name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(expert_width or config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab_size=int(config["vocab_size"]),
            # a missing key counts as untied: the larger (safer) estimate, and Llama's default
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            num_experts=experts,
            experts_per_token=int(config.get("num_experts_per_tok") or (2 if experts else 0)),
            attention_bias=bool(config.get("attention_bias", False)),
            logit_softcap=bool(config.get("final_logit_softcapping")),
            stored_float32=str(config.get("torch_dtype") or config.get("dtype") or "") == "float32",
            **(_moe_extras(config) if experts else {}),
            **_attention_extras(config),
        )


def _moe_extras(config: dict) -> dict:
    """Shared experts and dense layers of an MoE config (see ModelArch)."""
    layers = int(config["num_hidden_layers"])
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    if config.get("n_shared_experts"):
        shared = int(config["n_shared_experts"]) * int(config.get("moe_intermediate_size") or 0)
    if config.get("first_k_dense_replace") is not None:
        dense = min(layers, int(config["first_k_dense_replace"]))
    else:
        step, only = int(config.get("decoder_sparse_step") or 1), set(config.get("mlp_only_layers") or [])
        dense = sum(1 for i in range(layers) if i in only or (i + 1) % step != 0)
    return {"shared_expert_size": shared, "shared_expert_gate": bool(config.get("shared_expert_intermediate_size")),
            "dense_layers": dense, "dense_intermediate_size": int(config["intermediate_size"]) if dense else 0}


# what config.json does not say but the model type implies (see ModelArch)
QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "gemma3": "head", "gemma3_text": "head", "olmo2": "full", "olmoe": "full"}
QKV_BIAS = {"qwen2", "qwen2_moe"}
FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}


def _attention_extras(config: dict) -> dict:
    """Multi-head latent attention sizes and the q/k norm of a config (see ModelArch)."""
    kind = str(config.get("model_type"))
    extras = {"qk_norm": QK_NORM.get(kind, ""), "qkv_bias": kind in QKV_BIAS, "norms_per_layer": 4 if kind in FOUR_NORMS else 2}
    if config.get("kv_lora_rank"):
        extras.update(q_lora_rank=int(config.get("q_lora_rank") or 0), kv_lora_rank=int(config["kv_lora_rank"]),
                      qk_rope_head_dim=int(config.get("qk_rope_head_dim") or 0),
                      v_head_dim=int(config.get("v_head_dim") or 0))
    return extras


def known_archs() -> list[str]:
    """Names of the shipped architectures (file names in qforge/data/archs)."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def family_name(text: str) -> str:
    """The shipped name `text` stands for: any case, an alias, a Hub name's prefix and suffixes off
    ('Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'); `text` lowercased when none matches."""
    key = text.lower()
    while True:
        key = ALIASES.get(key, key)
        if (ARCH_DIR / f"{key}.json").is_file():
            return key
        trimmed = next((key[len(p):] for p in NAME_PREFIXES if key.startswith(p)), None)
        trimmed = trimmed or next((key[:-len(s)] for s in NAME_SUFFIXES if key.endswith(s)), None)
        trimmed = trimmed or re.sub(r"-v\d+(\.\d+)*$", "", key)  # a release: Mistral's -v0.3
        if trimmed == key:
            trimmed = None
        if not trimmed:
            return text.lower()
        key = trimmed


def shipped_arch(text: str) -> dict | None:
    """The config dict of the shipped family `text` names (see family_name), or None."""
    file = ARCH_DIR / f"{family_name(text)}.json"
    return json.loads(file.read_text()) if file.is_file() else None


def load_arch(name_or_path: str | Path) -> dict:
    """The config dict of a shipped architecture name (any case), of a config.json / its folder, of
    a .gguf file (its metadata: qforge.plan.sources) or of a Hub model id ORG/NAME (its config.json
    in the local Hugging Face cache, offline; when not cached, the shipped family NAME names, as
    'meta-llama/Llama-3.1-8B-Instruct' -> llama-3.1-8b).

    FileNotFoundError for a path that does not exist, a folder without config.json or a Hub id
    not in the cache; ValueError, listing the known names, for an unknown name.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if file.is_file() and file.suffix.lower() == ".gguf":
        from .sources import gguf_config
        return gguf_config(file)
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file} is not valid JSON: {exc}") from None
    shipped = shipped_arch(text)
    if shipped is not None:
        return shipped
    if path.is_dir():
        raise FileNotFoundError(f"no config.json in folder {name_or_path}")
    if text.endswith((".json", ".gguf")) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such {'GGUF' if text.endswith('.gguf') else 'config'} file: {text}")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", text):
        from .sources import hub_config_path
        try:
            return load_arch(hub_config_path(text))
        except FileNotFoundError:
            shipped = shipped_arch(text.split("/", 1)[1])  # not cached: a family's shape is the same
            if shipped is None:
                raise
            return shipped
    raise ValueError(f"unknown model '{text}': known names are {', '.join(known_archs())}, "
                     "or give a config.json, a model folder, a .gguf file or a Hub id ORG/NAME")


def as_arch(config: dict | ModelArch | str) -> ModelArch:
    """A ModelArch from a ModelArch, a config dict, or a name / path for load_arch."""
    if isinstance(config, ModelArch):
        return config
    if isinstance(config, dict):
        return ModelArch.from_config(config)
    return ModelArch.from_config(load_arch(config), name=str(config))


@dataclass(frozen=True)
class Weight:
    """One parameter tensor of the model, repeated `copies` times (usually once per layer)."""
    name: str
    numel: int  # elements in one copy
    copies: int
    kind: str  # "linear" (4-bit under QLoRA), "norm", "embedding", "router" or "bias"
    adapted: tuple[tuple[int, int], ...] = ()  # (in, out) of each matrix given a LoRA adapter


def model_weights(arch: ModelArch) -> list[Weight]:
    """Every parameter tensor of the model.

    MoE experts are stored as transformers 5 stores them: one fused [E, 2*I, H] gate_up tensor
    and one [E, H, I] down tensor per MoE layer, and adapted as PEFT's target_parameters adapts
    them: one LoRA pair per expert and fused matrix (A [r, H], B [2I, r] on gate_up; A [r, I],
    B [H, r] on down).
    """
    h, layers = arch.hidden_size, arch.num_layers
    weights = _attention_weights(arch)
    i, e, moe = arch.intermediate_size, arch.num_experts, arch.moe_layers
    if e:
        weights += [Weight("experts.gate_up_proj", e * 2 * i * h, moe, "linear", ((h, 2 * i),) * e),
                    Weight("experts.down_proj", e * i * h, moe, "linear", ((i, h),) * e),
                    Weight("router", h * e, moe, "router")]  # tiny and sensitive: kept in BF16
        if arch.shared_expert_size:
            weights += _mlp_weights("shared_expert.", h, arch.shared_expert_size, moe)
        if arch.shared_expert_gate:
            weights.append(Weight("shared_expert_gate", h, moe, "router"))
        if arch.dense_layers:
            weights += _mlp_weights("dense.", h, arch.dense_intermediate_size, arch.dense_layers)
    else:
        weights += _mlp_weights("", h, i, layers)
    weights += [Weight("input_layernorm", h, layers, "norm"), Weight("post_attention_layernorm", h, layers, "norm"),
                *([Weight("pre/post_feedforward_layernorm", 2 * h, layers, "norm")] if arch.norms_per_layer == 4 else []),
                Weight("norm", h, 1, "norm"), Weight("embed_tokens", arch.vocab_size * h, 1, "embedding")]
    if not arch.tie_word_embeddings:
        weights.append(Weight("lm_head", arch.vocab_size * h, 1, "embedding"))
    return weights


def _mlp_weights(prefix: str, h: int, i: int, copies: int) -> list[Weight]:
    return [Weight(prefix + "gate_proj", h * i, copies, "linear", ((h, i),)),
            Weight(prefix + "up_proj", h * i, copies, "linear", ((h, i),)),
            Weight(prefix + "down_proj", i * h, copies, "linear", ((i, h),))]


def _attention_weights(arch: ModelArch) -> list[Weight]:
    """q, k, v, o projections (or multi-head latent attention's), their biases and q/k norms."""
    h, q, kv, layers = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.num_layers
    if arch.kv_lora_rank:
        ql, kvl, rope, heads = arch.q_lora_rank, arch.kv_lora_rank, arch.qk_rope_head_dim, arch.num_heads
        nope = arch.head_dim - rope
        weights = ([Weight("q_a_proj", h * ql, layers, "linear", ((h, ql),)), Weight("q_a_layernorm", ql, layers, "norm"),
                    Weight("q_b_proj", ql * q, layers, "linear", ((ql, q),))] if ql else
                   [Weight("q_proj", h * q, layers, "linear", ((h, q),))])
        kv_b = heads * (nope + arch.v_head_dim)
        return weights + [Weight("kv_a_proj_with_mqa", h * (kvl + rope), layers, "linear", ((h, kvl + rope),)),
                          Weight("kv_a_layernorm", kvl, layers, "norm"),
                          Weight("kv_b_proj", kvl * kv_b, layers, "linear", ((kvl, kv_b),)),
                          Weight("o_proj", arch.o_dim * h, layers, "linear", ((arch.o_dim, h),))]
    weights = [
        Weight("q_proj", h * q, layers, "linear", ((h, q),)),
        Weight("k_proj", h * kv, layers, "linear", ((h, kv),)),
        Weight("v_proj", h * kv, layers, "linear", ((h, kv),)),
        Weight("o_proj", q * h, layers, "linear", ((q, h),)),
    ]
    if arch.attention_bias or arch.qkv_bias:
        weights.append(Weight("attn_bias", q + 2 * kv + (0 if arch.qkv_bias and not arch.attention_bias else h),
                              layers, "bias"))
    if arch.qk_norm:
        weights.append(Weight("q_norm, k_norm", 2 * arch.head_dim if arch.qk_norm == "head" else q + kv, layers, "norm"))
    return weights


def parameter_count(arch: ModelArch) -> int:
    """Parameters of the model (embeddings and an untied LM head included)."""
    return sum(w.numel * w.copies for w in model_weights(arch))


def expert_parameter_count(arch: ModelArch) -> int:
    """Parameters of the routed experts (the fused expert tensors of every MoE layer); 0 for a dense model."""
    return sum(w.numel * w.copies for w in model_weights(arch) if w.name.startswith("experts."))


def active_parameter_count(arch: ModelArch) -> int:
    """Parameters one token runs through: all but the routed experts it is not sent to (for
    Mixtral 8x22B 39B of 141B). The whole model for a dense one."""
    if not arch.num_experts:
        return parameter_count(arch)
    idle = (arch.num_experts - arch.experts_per_token) / arch.num_experts
    return parameter_count(arch) - round(idle * expert_parameter_count(arch))
