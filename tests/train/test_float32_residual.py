"""residual_dtype float32: qforge's forward equals PEFT's documented QLoRA recipe on the same 4-bit folder.

A tiny random Llama (float32 weights: its embeddings are not BF16 values) is quantised to NF4 with
double quantisation into one bitsandbytes-format folder; qforge loads it with residual_dtype
float32 (qforge.model.load reads embeddings and norms in float32, the adapted layers return their
float32 input's dtype), PEFT with prepare_model_for_kbit_training (every non-4-bit parameter upcast
to float32). With the same non-zero adapters and dropout off, one bf16-autocast forward gives the
same logits up to kernel summation order. The BF16 residual (the default) is measurably further
from PEFT, so the comparison can fail. On the embedded model the same comparison (step-0 eval loss
over val.jsonl, benchmarks/train_quality.py) is exact: 0.6702 on both sides.
"""
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from qforge.model.surgery import adapted_layers, linear_names, prepare_for_kbit_training, quantize_linears, \
    select_targets
from qforge.nn import AdaptedLinear, LoraSpec
from tests import fixtures

R, ALPHA = 8, 16


def tiny_llama() -> LlamaForCausalLM:
    model = fixtures.tiny_llama(128, vocab=256, tied=True, initializer_range=0.05).eval()
    return fixtures.perturb_norms(model, 0.1)  # norms away from 1, so their dtype matters


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from qforge.model.checkpoint import save_quantized
    model = copy.deepcopy(tiny_llama())
    quantize_linears(model, select_targets(linear_names(model), "all-linear"), compute_dtype=torch.bfloat16)
    return save_quantized(model, None, tmp_path_factory.mktemp("f32res") / "bnb")


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def adapter_weights(name: str, out_f: int, in_f: int):
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return (torch.rand(R, in_f, generator=gen) * 2 - 1) / in_f ** 0.5, torch.randn(out_f, R, generator=gen) * 0.05


def qforge_logits(folder, residual: torch.dtype | None):
    from qforge.model.load import load_model
    from qforge.model.surgery import add_adapter, use_float32_residual
    model, _ = load_model(str(folder), compute_dtype=torch.bfloat16, keep_float32=residual == torch.float32)
    add_adapter(model, "default", LoraSpec(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    if residual == torch.float32:
        use_float32_residual(model)
    prepare_for_kbit_training(model, False)
    with torch.no_grad():
        for n, layer in adapted_layers(model):
            A, B = adapter_weights(n, layer.out_features, layer.in_features)
            layer.adapters["default"].lora_A.weight.copy_(A)
            layer.adapters["default"].lora_B.weight.copy_(B)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch(), use_cache=False).logits.float()
    return out, model


def set_peft_adapters(model) -> dict:
    """Copy adapter_weights into every PEFT LoRA layer of `model`; {layer name: layer}."""
    layers = {}
    with torch.no_grad():
        for n, m in model.base_model.model.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                A, B = adapter_weights(n, m.out_features, m.in_features)
                m.lora_A["default"].weight.copy_(A)
                m.lora_B["default"].weight.copy_(B)
                layers[n] = m
    return layers


def peft_logits(folder):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    set_peft_adapters(model)
    model.train()  # bitsandbytes' Linear4bit repacks its weight after an eval-mode forward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**batch(), use_cache=False).logits.float()


def test_float32_residual_forward_equals_peft(folder):
    peft = peft_logits(folder)
    f32, model = qforge_logits(folder, torch.float32)
    bf16, _ = qforge_logits(folder, None)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert all(layer.keep_input_dtype for _, layer in adapted_layers(model))
    live = batch()["attention_mask"].bool()
    err32 = float((f32 - peft)[live].abs().max())
    err16 = float((bf16 - peft)[live].abs().max())
    scale = float(peft[live].abs().max())
    print(f"\nmax |logit - PEFT's|: float32 residual {err32:.3e}, bf16 residual {err16:.3e} (logits up to {scale:.2f})")
    assert err32 <= 1e-4 * scale  # below one BF16 ulp of the logits: the same arithmetic (measured: equal)
    assert err16 > 4 * max(err32, 1e-4 * scale)  # the default is measurably further: the test can fail


def test_residual_dtype_bad_value_is_a_clear_error(capsys):
    from qforge.cli import main
    from qforge.train.config import TrainConfig
    with pytest.raises(ValueError, match=r"residual_dtype: expected one of \('auto', 'bfloat16', 'float32'\), got 'fp16'"):
        TrainConfig(residual_dtype="fp16")
    # auto, the default, resolves on creation: PEFT's precision for the adapter methods, the compute
    # dtype for full fine-tuning (which refuses float32)
    assert TrainConfig().residual_dtype == "float32"
    assert TrainConfig(method="lora").residual_dtype == "float32"
    assert TrainConfig(method="full").residual_dtype == "bfloat16"
    assert TrainConfig(residual_dtype="bfloat16").residual_dtype == "bfloat16"
    with pytest.raises(ValueError, match="residual_dtype: float32 is for the adapter methods"):
        TrainConfig(method="full", residual_dtype="float32")
    with pytest.raises(SystemExit) as exc:  # argparse refuses it by its choices, in one line
        main(["train", "--residual-dtype", "float16", "--print-config"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --residual-dtype: invalid choice: 'float16' (choose from 'auto', " \
        "'bfloat16', 'float32')" in err[0]


def test_planner_counts_the_float32_residual():
    """The default (float32 residual for qlora) against the BF16 residual, on the CUDA constants:
    the float32 input embeddings, each layer's checkpointed input in float32, and the recomputed
    layer's MLP tensors (gate's and up's outputs, silu(gate)) in float32; the allocator's slack
    (fragmentation) on the activations added."""
    from qforge.plan import CUDA_BF16
    from qforge.plan.policy import plan_for_config
    from qforge.train.config import TrainConfig
    narrow = plan_for_config(TrainConfig(model="llama-3.1-8b", max_seq_len=1024, residual_dtype="bfloat16"),
                             "llama-3.1-8b", "cuda")
    wide = plan_for_config(TrainConfig(model="llama-3.1-8b", max_seq_len=1024), "llama-3.1-8b", "cuda")
    tokens = 4 * 1024  # TrainConfig's batch 4
    # Llama 3.1's embeddings are stored in BF16: the float32 residual casts their output, no float32
    # copy (a float32-stored matrix, as the embedded SmolLM2's, is read in float32: see below)
    embeddings = 0
    checkpoints = 2 * tokens * 32 * 4096  # +2 bytes per element of each layer's checkpointed input
    mlp = 2 * tokens * 3 * 14336  # +2 bytes per element of the recomputed layer's three MLP tensors
    assert wide.base_weights - narrow.base_weights == embeddings
    assert wide.activations - narrow.activations == checkpoints + mlp
    assert wide.temporary - narrow.temporary == pytest.approx(CUDA_BF16.fragmentation * (checkpoints + mlp), abs=2)
    small = dict(max_seq_len=64, gradient_checkpointing=False)
    narrow, wide = (plan_for_config(TrainConfig(model="smollm2", residual_dtype=r, **small), "smollm2", "cuda")
                    for r in ("bfloat16", "float32"))
    assert wide.base_weights - narrow.base_weights == 49152 * 576 * 2  # stored float32: read so


def test_planner_counts_a_tied_heads_copy_under_the_float32_residual():
    """A tied head's weight is the float32 embedding under the float32 residual: the head's product
    takes a BF16 copy of it (vocab x hidden x 2 bytes), alive through the loss; an untied head
    stays BF16 and needs none. Without checkpointing on the CPU constants (no slack), one-pass loss."""
    from qforge.plan import CPU_BF16, plan_run
    run = dict(seq_len=64, batch_size=1, rank=8, gradient_checkpointing=False, constants=CPU_BF16)
    for model, vocab, hidden, tied in (("smollm2", 49152, 576, True), ("qwen2.5-7b", 152064, 3584, False)):
        narrow, wide = (plan_run(model, "qlora", residual_bytes=r, **run) for r in (2, 4))
        assert wide.temporary - narrow.temporary == (2 * vocab * hidden if tied else 0), model


@pytest.mark.parametrize("attention", ["matrix", "sdpa"])
def test_float32_residual_training_step_gradients_match_peft(folder, attention, monkeypatch):
    """One training step as the trainer runs it (gradient checkpointing, qforge's attention and
    loss) against PEFT's recipe, non-zero B. With SDPA (forced here) the forward is PEFT's bit for
    bit: measured cosine 0.999984, worst per-tensor relative error 0.9%, the rest being backward
    arithmetic (the loss's and the base products' gradients in BF16 on both sides, summed in other
    orders). qforge's own path for these short rows is the matrix attention at SDPA's precision
    (qforge.nn.attention): the same BF16 inputs and float32 scores, summed in another order than
    SDPA's tiles, so BF16 roundings downstream flip and the forward is no longer bit-equal (layer
    1's down_proj, which no attention backward reaches, moves 0.96% against 0 with SDPA): measured
    cosine 0.999962, worst 1.74%. The BF16 residual on the same step: 0.99991 and 2.9% (bounded by
    test_grad_vs_peft at 0.99 and 5%)."""
    if attention == "sdpa":
        from qforge.kernels import dispatch
        monkeypatch.setattr(dispatch, "matrix_attention", lambda *a, **k: False)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from qforge.model.load import load_model
    from qforge.model.surgery import use_qforge_attention
    from qforge.train.loss import causal_lm_loss

    rows = batch()
    rows["labels"] = rows["input_ids"].masked_fill(rows["attention_mask"] == 0, -100)
    rows["labels"][:, :6] = -100
    from qforge.model.surgery import add_adapter, use_float32_residual
    model, _ = load_model(str(folder), compute_dtype=torch.bfloat16, keep_float32=True)
    add_adapter(model, "default", LoraSpec(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    use_float32_residual(model)
    prepare_for_kbit_training(model, True)
    use_qforge_attention(model)
    ours = {}
    with torch.no_grad():
        for n, layer in adapted_layers(model):
            A, B = adapter_weights(n, layer.out_features, layer.in_features)
            ours[n] = layer.adapters["default"]
            ours[n].lora_A.weight.copy_(A)
            ours[n].lora_B.weight.copy_(B)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal_lm_loss(model, rows).backward()

    peft = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.bfloat16)
    peft = prepare_model_for_kbit_training(peft, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
    peft = get_peft_model(peft, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    theirs = set_peft_adapters(peft)
    peft.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft(**rows, use_cache=False).loss.backward()

    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    pairs = [(getattr(ours[n], k).weight.grad, getattr(theirs[n], k)["default"].weight.grad)
             for n in sorted(ours) for k in ("lora_A", "lora_B")]
    q = torch.cat([a.flatten() for a, _ in pairs]).double()
    p = torch.cat([b.flatten() for _, b in pairs]).double()
    cosine = float(torch.nn.functional.cosine_similarity(q, p, dim=0))
    worst = max(float((a - b).norm() / b.norm()) for a, b in pairs)
    print(f"\nfloat32 residual vs PEFT: gradient cosine {cosine:.8f}, worst per-tensor relative error {worst:.2e}")
    assert cosine >= (0.99995 if attention == "sdpa" else 0.99993)
    assert worst <= (0.015 if attention == "sdpa" else 0.025)



def peft_dora_over_linear4bit(layer):
    """PEFT's DoRA over bitsandbytes' Linear4bit holding `layer`'s codes (its state dict is
    bitsandbytes' keys), with layer's adapter 'default' (A, B, magnitude) copied in. Train mode:
    Linear4bit repacks its weight after an eval-mode forward."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    sd, a = layer.state_dict(), layer.adapters["default"]
    linear4bit = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.bfloat16,
                                   quant_type="nf4")
    linear4bit.weight = bnb.nn.Params4bit.from_prequantized(
        sd["weight"], {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")},
        requires_grad=False, device="cpu")
    host = torch.nn.Sequential()
    host.add_module("proj", linear4bit)
    peft = get_peft_model(host, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"],
                                           use_dora=True))
    m = peft.base_model.model.proj
    with torch.no_grad():
        m.lora_A["default"].weight.copy_(a.lora_A.weight)
        m.lora_B["default"].weight.copy_(a.lora_B.weight)
        m.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
    return peft.train(), [m.lora_A["default"].weight, m.lora_B["default"].weight,
                          m.lora_magnitude_vector["default"].weight]


def test_dora_under_the_float32_residual_equals_peft_over_linear4bit():
    """DoRA under the float32 residual does LoRA's arithmetic: the base output (BF16 product)
    upcast to float32 and the variant's term (m/||W + sBA|| - 1) W x + m/||W + sBA|| s B A x
    added in float32, as PEFT's DoRA over bitsandbytes' Linear4bit computes it for a float32
    input under BF16 autocast (the hidden states of prepare_model_for_kbit_training's recipe).

    What is left is DoRA's norm: PEFT takes ||W + sBA|| of W dequantised to BF16 (the state's
    dtype) plus s B A made in BF16 under autocast, qforge of float32 values, so each row's scale
    differs by a mean of 128 element roundings of relative size 2^-9 (measured: 4e-4 of the largest
    output). Bound: 2^-10 of the largest output. A BF16 sum (the BF16 residual, and DoRA before
    it summed in the residual's dtype) rounds each output by up to 2^-9 relative: measurably
    further, so the comparison can fail (measured 1.1e-2 against 1.0e-3). Gradients run BF16
    products on both sides (two per adapter weight, each rounding by 2^-9): bound 2^-7 relative."""
    torch.manual_seed(0)
    layer = AdaptedLinear.quantized(nn.Linear(128, 96, bias=False).to(torch.bfloat16), compute_dtype=torch.bfloat16)
    a = layer.add_adapter("default", LoraSpec(r=R, alpha=ALPHA, dropout=0.0, use_dora=True))
    with torch.no_grad():
        a.lora_B.weight.normal_(0, 0.05)
        a.magnitude.mul_(1 + 0.2 * torch.rand(96))  # away from its start: DoRA's scale matters
    peft, peft_params = peft_dora_over_linear4bit(layer)
    layer.train()
    x, g = torch.randn(4, 7, 128), torch.randn(4, 7, 96)  # a float32 residual stream

    def run(module, params, wide=None):
        if wide is not None:
            layer.keep_input_dtype = wide
        x_ = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x_)
        y.float().backward(g)
        return y.detach().float(), [x_.grad] + [p.grad.clone() for p in params]

    theirs, their_grads = run(peft, peft_params)
    wide, wide_grads = run(layer, [a.lora_A.weight, a.lora_B.weight, a.magnitude], wide=True)
    layer.zero_grad()
    narrow, _ = run(layer, [a.lora_A.weight, a.lora_B.weight, a.magnitude], wide=False)
    scale = float(theirs.abs().max())
    err32, err16 = float((wide - theirs).abs().max()), float((narrow - theirs).abs().max())
    print(f"\nDoRA vs PEFT over Linear4bit: float32 residual {err32:.2e}, bf16 {err16:.2e} (outputs up to {scale:.2f})")
    assert err32 <= 2 ** -10 * scale
    assert err16 > 4 * err32
    for ours, peft_grad in zip(wide_grads, their_grads):
        assert float((ours - peft_grad).norm() / peft_grad.norm()) <= 2 ** -7
