"""One training step's adapter gradients against bitsandbytes + PEFT (the oracle), as the two train:
BF16 autocast, non-reentrant gradient checkpointing, float32 adapters, the same 4-bit base.

Both sides load one bitsandbytes-format folder (qforge.model.checkpoint.save_quantized of a tiny
random Llama quantised to NF4 with double quantisation) and start from the same A and B (B made
non-zero, else A's gradient is zero). qforge runs its trainer's path (surgery.prepare_for_kbit_training,
its attention, qforge.train.loss.causal_lm_loss); PEFT its documented recipe
(prepare_model_for_kbit_training, LoraConfig, `model(**batch).loss`). The two are not the same
arithmetic: PEFT's recipe upcasts norms and embeddings to float32 and carries a float32 residual
stream, qforge a BF16 one; what must agree is the gradient up to BF16 rounding.
Measured here (torch 2.13 CPU, peft 0.21.2, bitsandbytes 0.50.2): cosine of the concatenated
gradients 0.9999+, worst per-tensor relative error about 1-2%. Bounds: cosine >= 0.99 (the issue's
figure) and per-tensor relative error <= REL_ERR_BOUND.
"""
import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from qforge.model.surgery import adapted_layers, prepare_for_kbit_training, quantize_linears, select_targets, \
    linear_names, use_qforge_attention
from qforge.nn import LoraSpec
from tests import fixtures

REL_ERR_BOUND = 0.05
COSINE_BOUND = 0.99
R, ALPHA = 8, 16


def tiny_llama() -> LlamaForCausalLM:
    return fixtures.tiny_llama(128, vocab=256, tied=True, initializer_range=0.05).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The 4-bit folder both sides load: NF4 + double quantisation of every linear but lm_head."""
    from qforge.model.checkpoint import save_quantized
    model = copy.deepcopy(tiny_llama())
    quantize_linears(model, select_targets(linear_names(model), "all-linear"), compute_dtype=torch.bfloat16)
    return save_quantized(model, None, tmp_path_factory.mktemp("grad") / "bnb")


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def start_weights(layers: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Float32 (A, B) per layer: A as PEFT's kaiming init would give, B small and non-zero."""
    gen = torch.Generator().manual_seed(5)
    out = {}
    for name, (out_f, in_f) in layers:
        bound = 1 / in_f ** 0.5
        out[name] = ((torch.rand(R, in_f, generator=gen) * 2 - 1) * bound, torch.randn(out_f, R, generator=gen) * 0.02)
    return out


def qforge_grads(folder, keep_base_outputs: bool):
    from qforge.model.load import load_model
    from qforge.model.surgery import add_adapter
    from qforge.train.loss import causal_lm_loss
    model, _ = load_model(str(folder), compute_dtype=torch.bfloat16)
    add_adapter(model, "default", LoraSpec(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    prepare_for_kbit_training(model, True, keep_base_outputs=keep_base_outputs)
    use_qforge_attention(model)
    layers = dict(adapted_layers(model))
    init = start_weights([(n, (l.out_features, l.in_features)) for n, l in sorted(layers.items())])
    with torch.no_grad():
        for n, (A, B) in init.items():
            layers[n].adapters["default"].lora_A.weight.copy_(A)
            layers[n].adapters["default"].lora_B.weight.copy_(B)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(model, batch())
    loss.backward()
    grads = {}
    for n, layer in layers.items():
        a = layer.adapters["default"]
        assert a.lora_A.weight.dtype == torch.float32 and a.lora_A.weight.grad.dtype == torch.float32
        grads[n] = (a.lora_A.weight.grad, a.lora_B.weight.grad)
    return float(loss.detach()), grads, layers


def peft_grads(folder, layer_shapes):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    init = start_weights(layer_shapes)
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for n, (A, B) in init.items():
            modules[n].lora_A["default"].weight.copy_(A)
            modules[n].lora_B["default"].weight.copy_(B)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch(), use_cache=False).loss
    loss.backward()
    grads = {}
    for n in init:
        A, B = modules[n].lora_A["default"].weight, modules[n].lora_B["default"].weight
        assert A.dtype == torch.float32  # PEFT's autocast_adapter_dtype
        grads[n] = (A.grad, B.grad)
    codes = {n: modules[n].base_layer.weight.data.flatten() for n in init}  # bitsandbytes' packed 4-bit codes
    return float(loss.detach()), grads, codes


@pytest.mark.parametrize("keep_base_outputs", [False, True], ids=["full-recompute", "keep-base-outputs"])
def test_one_step_gradients_match_peft(folder, keep_base_outputs):
    q_loss, q_grads, layers = qforge_grads(folder, keep_base_outputs)
    shapes = [(n, (l.out_features, l.in_features)) for n, l in sorted(layers.items())]
    p_loss, p_grads, p_codes = peft_grads(folder, shapes)
    for n, layer in layers.items():  # the same 4-bit base on both sides
        assert torch.equal(layer.base.quant_state.packed.flatten(), p_codes[n]), n
    assert sorted(q_grads) == sorted(p_grads) and len(q_grads) == 14  # 7 linears x 2 layers
    assert q_loss == pytest.approx(p_loss, rel=5e-3)
    q_all = torch.cat([g.flatten() for n in sorted(q_grads) for g in q_grads[n]])
    p_all = torch.cat([g.flatten() for n in sorted(p_grads) for g in p_grads[n]])
    cosine = float(torch.nn.functional.cosine_similarity(q_all, p_all, dim=0))
    worst = max(float((q - p).norm() / p.norm()) for n in q_grads for q, p in zip(q_grads[n], p_grads[n]))
    print(f"\nloss qforge {q_loss:.6f} peft {p_loss:.6f}; gradient cosine {cosine:.6f}, "
          f"worst per-tensor relative error {worst:.4f}")
    assert cosine >= COSINE_BOUND
    assert worst <= REL_ERR_BOUND
