"""Tiny random MoE models built in memory by transformers (fused 3-D experts), their qforge 4-bit
twins and the plain transformers model holding the twins' dequantised weights."""
import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from qforge.model import surgery
from qforge.quant import dequantize

VOCAB = 96


def tiny_moe(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer float32 Mixtral, Qwen3-MoE or Qwen2-MoE: hidden 64, 4 experts of width 32, top-2 routing."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
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
    model = copy.deepcopy(dense)
    surgery.quantize_linears(model, surgery.select_targets(surgery.linear_names(model), "all-linear"),
                             quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    surgery.quantize_experts(model, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    return model.eval()


def dequantized_moe(qmodel: nn.Module, dense: nn.Module) -> nn.Module:
    """A plain transformers model whose linear and expert weights are qmodel's dequantised ones."""
    base = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in surgery.adapted_layers(qmodel):
            base.get_submodule(name).weight.copy_(dequantize(layer.base.quant_state, torch.float32))
        for name, experts in surgery.expert_layers(qmodel):
            for p in ("gate_up_proj", "down_proj"):
                getattr(base.get_submodule(name), p).copy_(experts.dequantized(p))
    return base.eval()


def randomise_adapters(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in surgery.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
