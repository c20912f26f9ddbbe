"""The tests' tiny models, tokenizers, folders and adapters, in one place.

Every builder seeds torch's global generator itself and then builds, so the same arguments give the
same weights bit for bit (golden values and oracle comparisons rely on it). Only the config keys a
caller names are passed to transformers; the rest keep transformers' defaults. Plain functions:
tests import them; tests/conftest.py exposes the few that read better as pytest fixtures.

    tiny_llama(...)            a random LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 KV heads)
    vocab_of(tok, ...)         the config keys that put a model over a tokenizer's vocabulary
    perturb_norms(model)       norms (and biases) moved off their initial values
    quantize_all(model, ...)   every linear but lm_head as a 4-bit AdaptedLinear
    tiny_served_llama(tok)     the serving tests' NF4 Llama over a tokenizer
    tiny_family(model_type)    a random model of each family in FAMILIES (llama ... deepseek_v3)
    tiny_moe(arch)             a random Mixtral / Qwen2-MoE / Qwen3-MoE (fused 3-D experts), its
                               4-bit twin (quantized_moe) and dequantised twin (dequantized_moe)
    word_tokenizer()           a word-level tokenizer with a ChatML template (no files needed)
    smollm2_tokenizer()        the embedded model's tokenizer (read from its GGUF once per process)
    write_tiny_folder(...)     a model saved as a Hugging Face folder (+ tokenizer)
    write_tiny(folder, ...)    the loader tests' checkpoint (checkpoint_config), sharded or not
    tiny_model_folder(folder)  a Llama folder over SmolLM2's tokenizer (jobs, serve, commands)
    tiny_mixtral_folder(folder)  a random Mixtral folder (4 experts, top 2) over the word tokenizer
    random_lora(model, ...)    an attached LoRA adapter with random non-zero A and B
    randomise_adapters(model)  every adapter parameter of a model drawn at random
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

WORD_VOCAB = 96  # word_tokenizer's vocabulary: <unk> <s> </s> <|im_start|> <|im_end|> w0 .. w90
MOE_VOCAB = 96


def tiny_llama_config(hidden: int = 64, layers: int = 2, vocab: int = 96, tied: bool | None = None, *,
                      heads: int = 4, kv_heads: int = 2, intermediate: int | None = None, **config) -> LlamaConfig:
    """A small LlamaConfig: intermediate 2 * hidden unless given; `tied` and any other key
    (max_position_embeddings, initializer_range, token ids, ...) only when named."""
    if tied is not None:
        config["tie_word_embeddings"] = tied
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, **config)


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 96, tied: bool | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0, **config) -> LlamaForCausalLM:
    """A random LlamaForCausalLM in `dtype` (train mode), its weights drawn after manual_seed(seed)."""
    cfg = tiny_llama_config(hidden, layers, vocab, tied, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def vocab_of(tokenizer, *special: str) -> dict:
    """Config keys for a model over `tokenizer`: vocab=len(tokenizer), and `<name>_token_id` for each
    name in `special` ("bos", "eos", "pad"). The pad id matters to the weights: transformers zeroes
    the embedding row of padding_idx."""
    return {"vocab": len(tokenizer), **{f"{s}_token_id": getattr(tokenizer, f"{s}_token_id") for s in special}}


def perturb_norms(model: nn.Module, std: float = 0.1, biases: bool = False) -> nn.Module:
    """Norm weights (and biases, which start at zero) moved by N(0, std) from the global generator,
    so that their dtype and values matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or (biases and name.endswith(".bias")):
                p.add_(torch.randn_like(p) * std)
    return model


def quantize_all(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                 compute_dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
    """Every linear layer but lm_head as a 4-bit AdaptedLinear, in place; the model."""
    from qforge.model.surgery import linear_names, quantize_linears, select_targets

    quantize_linears(model, select_targets(linear_names(model), "all-linear"), quant_type, blocksize,
                     compute_dtype=compute_dtype, **kw)
    return model


def tiny_moe(arch: str, seed: int = 0, vocab: int = MOE_VOCAB) -> nn.Module:
    """A 2-layer float32 Mixtral, Qwen3-MoE or Qwen2-MoE (eval mode): hidden 64, 4 experts of width
    32, top-2 routing."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, initializer_range=0.1, tie_word_embeddings=False)
    if arch == "mixtral":
        cfg = MixtralConfig(intermediate_size=32, num_local_experts=4, **common)
    elif arch == "qwen2_moe":  # with a shared expert: three more linear layers and a 1-wide gate per layer
        cfg = Qwen2MoeConfig(moe_intermediate_size=32, intermediate_size=64, num_experts=4,
                             shared_expert_intermediate_size=32, **common)
    else:
        cfg = Qwen3MoeConfig(moe_intermediate_size=32, intermediate_size=64, num_experts=4, head_dim=16,
                             decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **common)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def quantized_moe(dense: nn.Module, quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    """A deep copy of `dense` with every linear but lm_head and every experts module in 4 bits
    (float32 compute)."""
    from qforge.model import surgery

    model = quantize_all(copy.deepcopy(dense), quant_type, double_quant=double_quant)
    surgery.quantize_experts(model, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    return model.eval()


def dequantized_moe(qmodel: nn.Module, dense: nn.Module) -> nn.Module:
    """A plain transformers model whose linear and expert weights are qmodel's dequantised ones."""
    from qforge.model import surgery
    from qforge.quant import dequantize

    base = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in surgery.adapted_layers(qmodel):
            base.get_submodule(name).weight.copy_(dequantize(layer.base.quant_state, torch.float32))
        for name, experts in surgery.expert_layers(qmodel):
            for p in ("gate_up_proj", "down_proj"):
                getattr(base.get_submodule(name), p).copy_(experts.dequantized(p))
    return base.eval()


def randomise_adapters(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Every adapter parameter (LoRA A and B, expert adapters too) drawn from N(0, std), seeded."""
    from qforge.model import surgery

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in surgery.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# Every causal-LM family a user would QLoRA-tune, tiny (sizes multiples of 64 wherever a Linear's
# input is: bitsandbytes' CPU Linear4bit, an oracle, crashes in eval mode otherwise).
FAMILY_VOCAB = 128
FAMILY_CONFIG = dict(vocab_size=FAMILY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
_MOE = dict(num_experts_per_tok=2)
FAMILIES = {  # model_type -> config beyond FAMILY_CONFIG
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16}, "gemma3_text": {"head_dim": 16}, "phi3": {}, "olmo2": {}, "granite": {},
    "gpt_neox": {}, "phi": {},
    "mixtral": {"num_local_experts": 4, **_MOE},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, **_MOE},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16, **_MOE},
    "deepseek_v3": {"n_routed_experts": 4, "moe_intermediate_size": 64, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "kv_lora_rank": 64, "q_lora_rank": 64, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1, **_MOE},
    "olmoe": {"num_experts": 4, **_MOE},
    "granitemoe": {"num_local_experts": 4, **_MOE},
    "phimoe": {"num_local_experts": 4, **_MOE},
}
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "granitemoe", "phimoe"}


def tiny_family(family: str, seed: int = 0) -> nn.Module:
    """A random model of `family` (a transformers model_type in FAMILIES), float32, train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **FAMILY_CONFIG, **FAMILIES[family])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def word_tokenizer(vocab: int = WORD_VOCAB):
    """A word-level fast tokenizer ("w0 w1 ..."), with a ChatML chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(vocab - 5)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=template)


_SMOLLM2_TOKENIZER = None


def smollm2_tokenizer():
    """The embedded model's tokenizer (ChatML template), read from its GGUF file once per process."""
    global _SMOLLM2_TOKENIZER
    if _SMOLLM2_TOKENIZER is None:
        from transformers import AutoTokenizer

        from qforge.model.embedded import smollm2_gguf_path

        path = smollm2_gguf_path()
        _SMOLLM2_TOKENIZER = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _SMOLLM2_TOKENIZER


def write_tiny_folder(folder: Path, model: nn.Module, tokenizer=None, shard: str | None = None) -> Path:
    """`model` saved with save_pretrained into `folder` (sharded when `shard`, e.g. "100KB"), with
    `tokenizer` beside it when given; the folder."""
    model.save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    if tokenizer is not None:
        from qforge.model.checkpoint import save_tokenizer

        save_tokenizer(tokenizer, folder)
    return Path(folder)


def random_lora(model: nn.Module, name: str, seed: int, r: int = 4, dtype: torch.dtype = torch.float32,
                scale: float = 0.3) -> None:
    """Attach LoRA adapter `name` (alpha 2r, no dropout) with random A and random non-zero B drawn
    from a generator seeded with `seed` (so it changes the output); no adapter left active."""
    from qforge.model.surgery import add_adapter, set_active_adapter
    from qforge.nn import LoraSpec

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


def tiny_served_llama(tokenizer, dtype: torch.dtype = torch.float32, seed: int = 0, context: int = 256,
                      layers: int = 2) -> LlamaForCausalLM:
    """The serving tests' model (eval mode): a random Llama (hidden 64) over the tokenizer's
    vocabulary, every linear but lm_head in NF4. A wide initialisation keeps its logits peaked, so
    greedy choices are not near-ties."""
    model = tiny_llama(layers=layers, tied=True, dtype=dtype, seed=seed, max_position_embeddings=context,
                       initializer_range=0.1, **vocab_of(tokenizer, "bos", "eos", "pad"))
    quantize_all(model, compute_dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def tiny_model_folder(folder: Path) -> Path:
    """A random Llama (hidden 64, 2 layers, float32) over SmolLM2's vocabulary and chat template,
    saved as a Hugging Face folder with its tokenizer: `qforge serve --base FOLDER` and the trainer
    load it, and a job on it trains in seconds."""
    tok = smollm2_tokenizer()
    model = tiny_llama(tied=True, max_position_embeddings=512, **vocab_of(tok, "bos", "eos", "pad"))
    return write_tiny_folder(folder, model, tok)


def tiny_mixtral_folder(folder: Path, layers: int = 2) -> Path:
    """A random Mixtral (hidden 64, 4 experts of intermediate 64, top 2, untied head; seed 0) saved
    as a Hugging Face folder with tests/model/conftest.py's word tokenizer: the MoE run, offload and
    sharding tests train it."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from tests.model.conftest import tiny_tokenizer
    cfg = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def checkpoint_config(tied: bool = True, bias: bool = False, rope: dict | None = None, layers: int = 2) -> LlamaConfig:
    """The loader tests' Llama over word_tokenizer's vocabulary: hidden 128 and intermediate 256
    (multiples of 64: bitsandbytes' CPU Linear4bit, an oracle there, crashes in eval mode otherwise)."""
    extra = {"rope_parameters": rope} if rope else {}
    return tiny_llama_config(128, layers, WORD_VOCAB, tied, max_position_embeddings=512, attention_bias=bias,
                             mlp_bias=bias, **extra)


def write_tiny(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, shard: str | None = None,
               **config_kw) -> Path:
    """A random checkpoint_config(**config_kw) model saved into `folder` (sharded when `shard`, e.g.
    "100KB"), its biases and norms moved off their initial values so that they matter."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(checkpoint_config(**config_kw)).to(dtype)
    perturb_norms(model, 0.1, biases=True)
    write_tiny_folder(folder, model, shard=shard)
    return folder
