"""4-bit MoE experts (qforge.nn.experts): per-expert quantisation bit-identical to bitsandbytes,
forward and gradients equal to transformers' experts module on the dequantised weights, only
routed experts dequantised, the model's dense leftovers, and 20 training steps lowering the loss."""
import logging
from types import SimpleNamespace

import bitsandbytes.functional as bnbF
import pytest
import torch

from qforge.model import surgery
from qforge.nn import LoraSpec
from qforge.nn.experts import ExpertBank, AdaptedExperts
from qforge.train.config import TrainConfig
from qforge.train.loop import train_loop

from tests.fixtures import dequantized_moe, quantized_moe, randomise_adapters, tiny_moe
from tests.numerics import grad_atol

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
torch._dynamo.config.disable = True  # bitsandbytes' oracle kernels run eagerly (see tests/quant)
ARCHS = ["mixtral", "qwen3_moe"]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_expert_is_bitsandbytes_quantize_4bit_of_its_slice(quant_type, double_quant, dtype):
    g = torch.Generator().manual_seed(0)
    # rows of whole blocks: bitsandbytes' native CPU dequantiser needs them (DESIGN.md)
    weight = (torch.randn(3, 96, 128, generator=g) * 0.02).to(dtype)
    for blocksize in (64, 128):
        bank = ExpertBank.quantize(weight, quant_type, blocksize, double_quant)
        assert bank.packed.shape == (3, 96 * 128 // 2) and bank.packed.dtype == torch.uint8
        for e in range(3):
            packed, st = bnbF.quantize_4bit(weight[e], blocksize=blocksize, compress_statistics=double_quant,
                                            quant_type=quant_type)
            assert torch.equal(bank.packed[e], packed.view(-1)), (e, blocksize)
            assert torch.equal(bank.absmax[e], st.absmax), (e, blocksize)
            if double_quant:
                assert torch.equal(bank.nested_absmax[e], st.state2.absmax)
                assert bank.offsets[e].item() == st.offset.item()
            assert torch.equal(bank.dequantize_expert(e, dtype), bnbF.dequantize_4bit(packed, st))


def _routing(module, x):
    _, weights, index = module.gate(x)
    return weights, index


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_gradients_equal_transformers_experts_on_dequantised_weights(arch):
    dense = tiny_moe(arch)
    qmodel = quantized_moe(dense)
    surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    randomise_adapters(qmodel)
    ref_model = dequantized_moe(qmodel, dense)
    block, ref_block = qmodel.model.layers[1].mlp, ref_model.model.layers[1].mlp
    experts, ref = block.experts, ref_block.experts
    assert isinstance(experts, AdaptedExperts)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    weights, index = _routing(ref_block, x)
    loras = experts.adapters["default"]

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = experts(x1, index, weights)
    # the reference: transformers' own experts forward with W + s B A as its parameters
    params = {p: getattr(ref, p) + loras[p].delta_weight() for p in ("gate_up_proj", "down_proj")}
    theirs = torch.func.functional_call(ref, params, (x2, index, weights))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, [x1, loras["down_proj"].lora_A, loras["gate_up_proj"].lora_B], g)
    ref_grads = torch.autograd.grad(theirs, [x2, loras["down_proj"].lora_A, loras["gate_up_proj"].lora_B], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the whole model without its adapter: the logits of the dequantised transformers model
    surgery.set_active_adapter(qmodel, None)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids).logits, ref_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_only_the_routed_experts_are_dequantised(monkeypatch):
    dense = tiny_moe("mixtral")
    qmodel = quantized_moe(dense)
    surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    experts = qmodel.model.layers[0].mlp.experts
    calls = []
    real = ExpertBank.dequantize_expert
    monkeypatch.setattr(ExpertBank, "dequantize_expert", lambda self, e, dtype: calls.append(e) or real(self, e, dtype))
    x = torch.randn(6, 64, requires_grad=True)
    index = torch.tensor([[1, 3], [3, 1], [1, 3], [3, 1], [1, 3], [1, 3]])  # experts 0 and 2 get no token
    weights = torch.full((6, 2), 0.5)
    experts(x, index, weights).sum().backward()
    # forward: each routed expert's two parameters once; backward: once more each
    assert sorted(calls) == [1, 1, 1, 1, 3, 3, 3, 3]


def test_quantize_experts_leaves_only_router_norms_embeddings_and_attention_dense():
    dense = tiny_moe("qwen3_moe")
    qmodel = quantized_moe(dense)
    names = [n for n, _ in surgery.expert_layers(qmodel)]
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dtype=torch.float32))
    surgery.prepare_for_kbit_training(qmodel)
    frozen_float = {n for n, p in qmodel.named_parameters() if p.is_floating_point() and not p.requires_grad}
    kinds = {n.split(".")[-2] if n.endswith(".weight") else n for n in frozen_float}
    # what stays in floats: the routers, the norms, the embedding and lm_head; no expert, no linear
    assert kinds == {"gate", "input_layernorm", "post_attention_layernorm", "q_norm", "k_norm", "norm",
                     "embed_tokens", "lm_head"}
    dense_experts = sum(p.numel() for n, p in dense.named_parameters() if ".experts." in n)
    packed = sum(b.numel() for n, b in qmodel.named_buffers() if ".experts." in n and b.dtype == torch.uint8
                 and n.endswith("proj"))
    assert packed * 2 == dense_experts  # two 4-bit codes a byte, every expert weight
    expert_lora = [n for n, p in qmodel.named_parameters() if p.requires_grad and ".experts." in n]
    assert len(expert_lora) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (A, B)
    from qforge.train.run import count_parameters
    trainable, total = count_parameters(qmodel)  # a 4-bit expert weight counts its elements, as PEFT counts
    assert total == sum(p.numel() for p in dense.parameters()) + trainable


def test_state_dict_round_trip_and_dtype_casts_keep_the_scales():
    dense = tiny_moe("mixtral")
    qmodel = quantized_moe(dense)
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.uint8
    other = quantized_moe(tiny_moe("mixtral", seed=5))
    other.load_state_dict(state)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, qmodel(ids).logits)
        experts = other.model.layers[0].mlp.experts
        experts.to(torch.bfloat16)  # a cast must not round the float32 scales of the experts
        assert experts.gate_up_proj_nested_absmax.dtype == torch.float32
        original = qmodel.model.layers[0].mlp.experts
        assert torch.equal(experts.dequantized("gate_up_proj"), original.dequantized("gate_up_proj"))


def copy_task(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    reply = [5, 9, 14, 20, 27, 35]
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, 96, (6,), generator=g).tolist() + [2]
        rows.append({"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply})
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_twenty_steps_lower_the_loss(arch, tmp_path):
    qmodel = quantized_moe(tiny_moe(arch))
    surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dropout=0.05, dtype=torch.float32))
    surgery.prepare_for_kbit_training(qmodel, keep_base_outputs=True)  # selective checkpointing: the tape
    data = copy_task()
    cfg = TrainConfig(output_dir=str(tmp_path), lr=1e-2, batch_size=4, max_steps=20, compute_dtype="float32",
                      warmup_ratio=0.1, seed=3, optimizer="paged_adamw_8bit")
    before = {n: p.detach().clone() for n, p in qmodel.named_parameters() if ".experts.adapters." in n}
    result = train_loop(qmodel, SimpleNamespace(pad_token_id=0, eos_token_id=1), data, None, cfg, log=lambda *_: None)
    assert len(result.losses) == 20
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.7 * first, result.losses
    moved = [n for n, p in qmodel.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every expert A and B trained


def test_a_streaming_loader_places_one_expert_tensor_at_a_time_on_a_meta_skeleton():
    dense = tiny_moe("mixtral")
    with torch.device("meta"):
        skeleton = type(dense)(dense.config)
    state = dense.state_dict()
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        surgery.place_quantized_expert(skeleton, name, state[name], compute_dtype=torch.float32)
    reference = quantized_moe(dense)
    for (name, ours), (_, theirs) in zip(surgery.expert_layers(skeleton), surgery.expert_layers(reference)):
        for key, t in theirs.named_buffers():
            assert torch.equal(getattr(ours, key), t), (name, key)
    with pytest.raises(ValueError, match=r"has shape \[4, 64, 32\], expected \[4, 64, 64\]"):
        surgery.place_quantized_expert(skeleton, "model.layers.0.mlp.experts.gate_up_proj",
                                       state["model.layers.0.mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="not a fused expert parameter"):
        surgery.place_quantized_expert(skeleton, "model.layers.0.mlp.gate.weight",
                                       state["model.layers.0.mlp.gate.weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_selective_checkpointing_replays_the_expert_products(arch, monkeypatch):
    """keep_base_outputs: backward's recomputation takes every expert product from the tape (no
    dequantisation beyond the no-checkpointing run's) and the gradients are the same."""
    calls = []
    real = ExpertBank.dequantize_expert
    monkeypatch.setattr(ExpertBank, "dequantize_expert", lambda self, e, dtype: calls.append(e) or real(self, e, dtype))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    grads, counts = {}, {}
    for mode in ("none", "keep", "full"):
        qmodel = quantized_moe(tiny_moe(arch))
        surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
        randomise_adapters(qmodel)
        surgery.prepare_for_kbit_training(qmodel, gradient_checkpointing=mode != "none",
                                          keep_base_outputs=mode == "keep")
        qmodel.train()
        calls.clear()
        qmodel(ids, labels=ids).loss.backward()
        counts[mode] = len(calls)
        grads[mode] = [p.grad.clone() for _, p in surgery.adapter_parameters(qmodel)]
    assert counts["keep"] == counts["none"] < counts["full"]
    for mode in ("keep", "full"):  # recomputation may order the sums over the 24 tokens differently
        for a, b in zip(grads[mode], grads["none"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=grad_atol(b, ids.numel()))


FAMILIES = {  # more MoE families transformers 5.24 ships with fused experts (tiny configs)
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_other_moe_families_quantise_to_their_dequantised_logits(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM
    import copy

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=32,
                               max_position_embeddings=64, eos_token_id=1, **FAMILIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    reference = copy.deepcopy(model)
    assert surgery.quantize_experts(model, compute_dtype=torch.float32)
    with torch.no_grad():
        for name, experts in surgery.expert_layers(model):
            for p in ("gate_up_proj", "down_proj"):
                getattr(reference.get_submodule(name), p).copy_(experts.dequantized(p))
        ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-6)


def test_unsupported_experts_layout_is_refused_by_name():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="GptOssExperts: has_bias=True is not supported"):
        surgery.quantize_experts(model)
