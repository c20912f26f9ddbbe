"""qforge's DPO and ORPO against TRL 1.16's own loss code, on identical rows, tokens and adapter weights.

Both sides start from one tiny random Llama (tests/fixtures.py, float32, hidden 64: bitsandbytes'
CPU Linear4bit wants in_features a multiple of 64): on a 4-bit base, from one bitsandbytes-format
folder (qforge's loader on one side, transformers + bitsandbytes' Linear4bit under PEFT on the
other); on a dense base, from the same weights. The LoRA A and B are drawn once and copied into
both. TRL computes its loss through its own code: DPOTrainer.compute_loss (its fused LM head, its
reference = the PEFT adapter disabled) and ORPOTrainer.get_batch_loss_metrics (full logits); qforge
through preference_step. Both in train mode (bitsandbytes' eval-mode trap, DESIGN.md), no dropout.

Tolerances from the arithmetic (tests/numerics.py): the two sides run the same float32 products
with differently ordered reductions (the LM head's tiles, logsumexp, the 4-bit product), so a
per-token log-prob can differ by about (hidden + vocab) float32 roundings of the largest logit, a
sequence's sum by n_tokens of those; rewards are beta times differences of such sums, the loss
moves by at most the same (|d/dz log sigmoid(z)| <= 1), and a gradient by sum_atol over the
tokens and hidden units that feed it.
"""
import pytest
import torch

from qforge.model.surgery import (add_adapter, adapted_layers, dense_lora_linears, linear_names, select_targets,
                                  set_active_adapter)
from qforge.nn import LoraSpec
from qforge.train.preference import (PreferenceConfig, adapter_active, dpo_loss, log1mexp, orpo_loss,
                                     preference_step, reference_logps, sequence_logps)
from tests import fixtures
from tests.numerics import EPS32, sum_atol

trl = pytest.importorskip("trl")

HIDDEN, VOCAB, R = 64, fixtures.WORD_VOCAB, 4


def base_model():
    return fixtures.tiny_llama(HIDDEN, vocab=VOCAB, tied=False, seed=0, initializer_range=0.2)


def pair_batch():
    """Two pairs with prompts, completions and padding of different lengths: chosen rows 0-1, rejected 2-3."""
    rows = [  # (prompt, completion)
        ([1, 10, 11, 12, 13], [20, 21, 22, 4]),
        ([1, 30, 31], [40, 41, 42, 43, 44, 4]),
        ([1, 10, 11, 12, 13], [25, 26, 4]),
        ([1, 30, 31], [50, 4]),
    ]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((4, width), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_weights(layers, seed: int = 7):
    """(A, B) per layer name, B non-zero so the adapter moves the outputs (else A's gradient is 0)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(R, l.in_features, generator=gen) * 0.2, torch.randn(l.out_features, R, generator=gen) * 0.2)
            for n, l in sorted(layers)}


def qforge_model(base: str, folder, ref_seed: int | None = None):
    """The qforge side: 4-bit (loaded from the bitsandbytes folder) or dense, adapter 'default'
    active (trainable) and, with ref_seed, a frozen adapter 'ref' of other weights."""
    if base == "nf4":
        from qforge.model.load import load_model
        model, _ = load_model(str(folder), compute_dtype=torch.float32)
    else:
        model = base_model()
        dense_lora_linears(model, select_targets(linear_names(model), "all-linear"), compute_dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = dict(adapted_layers(model))
    for name, seed in (("default", 7), ("ref", ref_seed)):
        if seed is None:
            continue
        add_adapter(model, name, LoraSpec(r=R, alpha=2 * R, dropout=0.0))
        with torch.no_grad():
            for n, (A, B) in lora_weights(layers.items(), seed).items():
                a = layers[n].adapters[name]
                a.lora_A.weight.copy_(A)
                a.lora_B.weight.copy_(B)
                a.lora_A.weight.requires_grad_(name == "default")
                a.lora_B.weight.requires_grad_(name == "default")
    set_active_adapter(model, "default")
    return model.train(), layers


def peft_base(base: str, folder):
    """The TRL side's base: transformers + bitsandbytes' Linear4bit from the folder, or dense."""
    from transformers import AutoModelForCausalLM

    if base == "dense":
        return base_model()
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    return model


def lora_config():
    from peft import LoraConfig
    return LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def set_peft_lora(model, shapes, adapter: str = "default", seed: int = 7) -> dict:
    """Copy lora_weights(seed) into a PEFT model's `adapter`, as float32: TRL casts the adapters of a
    quantised model to BF16 when it builds its trainer (the QLoRA paper's recipe), which would make
    the two sides compute different things; the comparison is of the loss code on equal weights."""
    modules = dict(model.base_model.model.named_modules())
    for n, (A, B) in lora_weights(shapes, seed).items():
        modules[n].lora_A[adapter].weight.data = A.clone()
        modules[n].lora_B[adapter].weight.data = B.clone()
    return modules


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from qforge.model.checkpoint import save_quantized
    model = fixtures.quantize_all(base_model(), compute_dtype=torch.float32)
    return save_quantized(model, None, tmp_path_factory.mktemp("pref") / "bnb")


def trl_args(tmp_path, config_cls, **kw):
    return config_cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, fp16=False,
                      per_device_train_batch_size=2, **kw)


def tiny_dataset():
    from datasets import Dataset
    return Dataset.from_list([{"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}])


def trl_dpo(model, tmp_path, beta, loss_type="sigmoid", label_smoothing=0.0, peft_config=None):
    """A DPOTrainer over `model` (a base and peft_config: TRL wraps it and its reference is the
    adapter disabled; a PeftModel: TRL adds a 'ref' copy of its adapter and that is the reference)."""
    from trl import DPOConfig, DPOTrainer
    tok = fixtures.word_tokenizer()
    tok.pad_token = tok.eos_token
    args = trl_args(tmp_path, DPOConfig, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    return DPOTrainer(model=model, args=args, train_dataset=tiny_dataset(), processing_class=tok,
                      peft_config=peft_config)


def trl_dpo_loss(trainer, batch):
    """TRL's DPOTrainer.compute_loss on our batch in its input form -> (loss, metrics)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_orpo(model, tmp_path, beta):
    """An ORPOTrainer over the PeftModel `model`."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    tok = fixtures.word_tokenizer()
    tok.pad_token = tok.eos_token
    args = trl_args(tmp_path, ORPOConfig, beta=beta, max_length=64)
    return ORPOTrainer(model=model, args=args, train_dataset=tiny_dataset(), processing_class=tok)


def trl_orpo_loss(trainer, b):
    """TRL's ORPOTrainer.get_batch_loss_metrics on our batch, split into its chosen/rejected form."""
    half = b["input_ids"].shape[0] // 2
    halves = (("chosen", slice(0, half)), ("rejected", slice(half, None)))
    inputs = {f"{side}_{key}": b[key][rows] for side, rows in halves for key in ("input_ids", "attention_mask", "labels")}
    trainer.model.train()
    return trainer.get_batch_loss_metrics(trainer.model, inputs)


def grads_of(layers, peft_modules=None):
    if peft_modules is None:
        return {n: (l.adapters["default"].lora_A.weight.grad, l.adapters["default"].lora_B.weight.grad)
                for n, l in layers.items()}
    return {n: (peft_modules[n].lora_A["default"].weight.grad, peft_modules[n].lora_B["default"].weight.grad)
            for n in layers}


def logps_atol(batch, logit_scale: float) -> float:
    """A summed completion log-prob: per token (hidden + vocab) float32 roundings of the largest
    logit, summed over a row's completion tokens."""
    n_tokens = int((batch["labels"] != -100).sum(1).max())
    return sum_atol(n_tokens * (HIDDEN + VOCAB), logit_scale)


def assert_grads_close(ours, theirs, batch):
    n_terms = int(batch["attention_mask"].sum()) * (HIDDEN + VOCAB)
    for n in ours:
        for g, t in zip(ours[n], theirs[n]):
            torch.testing.assert_close(g, t, rtol=0, atol=sum_atol(n_terms, t.abs().max()), msg=n)


def max_logit(model, batch) -> float:
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.abs().max())


def ours_and_trl_dpo(base, folder, tmp_path, batch, beta, label_smoothing=0.0, loss_type="sigmoid"):
    model, layers = qforge_model(base, folder)
    loss, metrics = preference_step(model, batch, PreferenceConfig("dpo", beta=beta, label_smoothing=label_smoothing))
    loss.backward()
    trainer = trl_dpo(peft_base(base, folder), tmp_path, beta, loss_type, label_smoothing, peft_config=lora_config())
    modules = set_peft_lora(trainer.model, list(layers.items()))
    t_loss, t_metrics = trl_dpo_loss(trainer, batch)
    t_loss.backward()
    return model, (loss, metrics, grads_of(layers)), (t_loss, t_metrics, grads_of(layers, modules))


def assert_dpo_close(model, batch, beta, ours, theirs):
    (loss, metrics, grads), (t_loss, t_metrics, t_grads) = ours, theirs
    tol = logps_atol(batch, max_logit(model, batch))
    for key in ("logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(t_metrics[key], abs=tol), key
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key] == pytest.approx(t_metrics[key], abs=4 * beta * tol), key
    assert metrics["rewards/accuracies"] == t_metrics["rewards/accuracies"]
    assert metrics["rewards/margins"] != 0.0  # the adapter moved the policy off the reference
    assert float(loss) == pytest.approx(float(t_loss), abs=4 * beta * tol)
    assert_grads_close(grads, t_grads, batch)


@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(folder, tmp_path, base, beta):
    batch = pair_batch()
    model, ours, theirs = ours_and_trl_dpo(base, folder, tmp_path, batch, beta)
    assert_dpo_close(model, batch, beta, ours, theirs)


def test_dpo_label_smoothing_matches_trl(folder, tmp_path):
    """eps > 0: TRL 1.16 keeps cDPO's smoothed sigmoid as loss_type 'aot', which sorts the pairs'
    log-ratio differences across the batch first: with one pair the sort is the identity."""
    one = {k: v[[0, 2]] for k, v in pair_batch().items()}
    model, ours, theirs = ours_and_trl_dpo("dense", folder, tmp_path, one, 0.3, 0.2, loss_type="aot")
    assert_dpo_close(model, one, 0.3, ours, theirs)


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_dpo_with_reference_adapter_matches_trl(folder, tmp_path, base):
    """A reference adapter: TRL, given a PeftModel, copies its adapter as 'ref' and uses that as the
    reference; the copy is then given other weights, the same as qforge's 'ref' adapter."""
    from peft import get_peft_model
    batch, beta = pair_batch(), 0.2
    model, layers = qforge_model(base, folder, ref_seed=11)
    loss, metrics = preference_step(model, batch, PreferenceConfig("dpo", beta=beta, ref_adapter="ref"))
    loss.backward()
    assert all(l.active_adapter == "default" for l in layers.values())
    assert all(l.adapters["ref"].lora_A.weight.grad is None for l in layers.values())
    trainer = trl_dpo(get_peft_model(peft_base(base, folder), lora_config()), tmp_path, beta)
    modules = set_peft_lora(trainer.model, list(layers.items()))
    set_peft_lora(trainer.model, list(layers.items()), "ref", seed=11)
    t_loss, t_metrics = trl_dpo_loss(trainer, batch)
    t_loss.backward()
    assert_dpo_close(model, batch, beta, (loss, metrics, grads_of(layers)),
                     (t_loss, t_metrics, grads_of(layers, modules)))


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_orpo_matches_trl(folder, tmp_path, base):
    from peft import get_peft_model
    batch, beta = pair_batch(), 0.25
    model, layers = qforge_model(base, folder)
    loss, metrics = preference_step(model, batch, PreferenceConfig("orpo", beta=beta))
    loss.backward()
    trainer = trl_orpo(get_peft_model(peft_base(base, folder), lora_config()), tmp_path, beta)
    modules = set_peft_lora(trainer.model, list(layers.items()))
    t_loss, t_metrics = trl_orpo_loss(trainer, batch)
    t_loss.backward()
    # mean log-probs: a sum's tolerance divided by at least one token; the NLL likewise
    tol = logps_atol(batch, max_logit(model, batch))
    for key in ("logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key] == pytest.approx(t_metrics[key], abs=4 * tol), key
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key] == pytest.approx(t_metrics[key], abs=4 * beta * tol), key
    assert metrics["rewards/accuracies"] == t_metrics["rewards/accuracies"]
    assert float(loss) == pytest.approx(float(t_loss), abs=4 * tol)
    assert_grads_close(grads_of(layers), grads_of(layers, modules), batch)


# ---------------------------------------------------------------------------------------------
# The parts, against plain full-logits arithmetic


def full_logits_logps(model, batch, labels=None):
    """The reference arithmetic: the whole [R, T, vocab] float32 log-softmax, gathered and masked."""
    labels = batch["labels"] if labels is None else labels
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = labels[:, 1:]
    logp = logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (targets != -100)                                          # [R, T-1]


def adapted_dense(model=None):
    model = model or base_model()
    dense_lora_linears(model, select_targets(linear_names(model), "all-linear"), compute_dtype=torch.float32)
    fixtures.random_lora(model, "default", seed=3, r=R)
    set_active_adapter(model, "default")
    for name, p in model.named_parameters():
        p.requires_grad_(".adapters." in name)
    return model.train()


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_sequence_logps_equal_the_full_log_softmax_without_holding_it(chunk_rows):
    model, batch = adapted_dense(), pair_batch()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    sums, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_rows)
    assert sums.dtype == torch.float32 and counts.tolist() == [4, 6, 3, 2]  # the completion tokens
    widest = max(s[0] for s in seen[1:])
    assert len(seen[0]) == 2 and seen[0][0] == 1  # the model's own head call: one position (the transform probe)
    assert widest <= (chunk_rows or 10 ** 9) and all(len(s) == 2 for s in seen)  # (rows, vocab), never [R, T, V]
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    ours = torch.autograd.grad(sums.sum() * 0.5 + sums[0], params)
    full = full_logits_logps(model, batch).sum(1)
    theirs = torch.autograd.grad(full.sum() * 0.5 + full[0], params)
    n = int(batch["attention_mask"].sum()) * (HIDDEN + VOCAB)
    torch.testing.assert_close(sums, full, rtol=0, atol=sum_atol(n, full.abs().max()))
    for g, t in zip(ours, theirs):
        torch.testing.assert_close(g, t, rtol=0, atol=sum_atol(n, t.abs().max()))


def test_soft_capped_logits_are_read_from_the_config():
    """Gemma 2 soft-caps its logits (final_logit_softcapping): the log-probs are of the capped logits."""
    model = fixtures.tiny_family("gemma2")
    assert model.config.final_logit_softcapping
    batch = pair_batch()
    sums, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_rows=2)
    full = full_logits_logps(model, batch).sum(1)
    n = int(batch["attention_mask"].sum()) * (HIDDEN + fixtures.FAMILY_VOCAB)
    torch.testing.assert_close(sums, full, rtol=0, atol=sum_atol(n, full.abs().max()))


def test_reference_is_the_base_or_the_named_adapter_and_keeps_no_graph():
    model, batch = adapted_dense(), pair_batch()
    fixtures.random_lora(model, "ref", seed=9, r=R)
    set_active_adapter(model, "default")
    expected = {}
    for name in (None, "ref", "default"):
        set_active_adapter(model, name)
        with torch.no_grad():
            expected[name] = full_logits_logps(model, batch).sum(1)
    set_active_adapter(model, "default")
    n = int(batch["attention_mask"].sum()) * (HIDDEN + VOCAB)
    for name in (None, "ref"):
        chosen, rejected = reference_logps(model, batch, name)
        assert not chosen.requires_grad and chosen.grad_fn is None
        torch.testing.assert_close(torch.cat([chosen, rejected]), expected[name], rtol=0,
                                   atol=sum_atol(n, expected[name].abs().max()))
        assert not torch.allclose(expected[name], expected["default"])
    assert all(layer.active_adapter == "default" for _, layer in adapted_layers(model))  # restored
    with pytest.raises(ValueError, match="reference adapter 'nope' is not attached"):
        with adapter_active(model, "nope"):
            pass


def test_adapter_active_restores_each_layer_after_an_error():
    model = adapted_dense()
    layers = [layer for _, layer in adapted_layers(model)]
    layers[0].active_adapter = None  # one layer off: restored as it was, not to the majority
    with pytest.raises(RuntimeError):
        with adapter_active(model, None):
            assert all(layer.active_adapter is None for layer in layers)
            raise RuntimeError
    assert layers[0].active_adapter is None and all(layer.active_adapter == "default" for layer in layers[1:])


def test_dpo_and_orpo_formulas():
    c, r = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -2.5])
    rc, rr = torch.tensor([-3.5, -4.0, -2.2]), torch.tensor([-3.0, -4.6, -2.4])
    beta, eps = 0.3, 0.1
    loss, m = dpo_loss(c, r, rc, rr, beta, eps)
    z = beta * ((c - rc) - (r - rr))
    manual = (-(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))).mean()
    assert float(loss) == pytest.approx(float(manual), rel=1e-6)
    assert float(m["rewards/accuracies"]) == pytest.approx(2 / 3)
    assert float(m["rewards/margins"]) == pytest.approx(float((z).mean()), rel=1e-6)
    # ORPO on mean log-probs, in float64 by hand
    mc, mr, nll = torch.tensor([-0.5, -1.2]), torch.tensor([-0.7, -0.9]), torch.tensor(1.3)
    loss, m = orpo_loss(mc, mr, nll, beta)
    d = lambda x: x.double()
    odds = (d(mc) - d(mr)) - (torch.log(1 - torch.exp(d(mc))) - torch.log(1 - torch.exp(d(mr))))
    assert float(loss) == pytest.approx(float(1.3 - beta * torch.log(torch.sigmoid(odds)).mean()), rel=1e-6)
    assert float(m["log_odds_chosen"]) == pytest.approx(float(odds.mean()), rel=1e-5)
    assert float(m["rewards/chosen"]) == pytest.approx(beta * float(mc.mean()), rel=1e-6)


def test_log1mexp_has_no_cancellation():
    """Near 0 (a likely reply) log(1 - exp x) computed naively loses every digit; here a few ulps.
    (Per-token means below -20 nats are outside what a model gives; float32 exp loses digits there.)"""
    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -2.0, -20.0])
    exact = torch.log(-torch.expm1(x.double()))
    torch.testing.assert_close(log1mexp(x).double(), exact, rtol=4 * EPS32, atol=0)


def test_orpo_completion_nll_is_the_mean_over_completion_tokens():
    model, batch = adapted_dense(), pair_batch()
    loss, m = preference_step(model, batch, PreferenceConfig("orpo", beta=0.2, orpo_nll="completion"))
    with torch.no_grad():
        logp = full_logits_logps(model, batch)
    mask = batch["labels"][:, 1:] != -100
    nll = -logp[:2].sum() / mask[:2].sum()
    n = int(mask.sum()) * (HIDDEN + VOCAB)
    assert m["nll_loss"] == pytest.approx(float(nll), abs=sum_atol(n, logp.abs().max()))
    means = logp.sum(1) / mask.sum(1)
    assert m["logps/chosen"] == pytest.approx(float(means[:2].mean()), abs=sum_atol(n, logp.abs().max()))


@pytest.mark.parametrize("quant", ["hqq4", "moe"])
def test_other_bases_train_against_their_own_base(quant):
    """HQQ and MoE experts (4-bit expert banks with their adapters): the reference is the base (every
    adapter, the experts' too, off), gradients reach every trainable adapter parameter."""
    from qforge.model import surgery
    if quant == "moe":
        model = fixtures.quantized_moe(fixtures.tiny_moe("qwen3_moe"))
    else:
        model = fixtures.quantize_all(base_model(), quant_type=quant, blocksize=64)
    add_adapter(model, "default", LoraSpec(r=R, alpha=2 * R, dropout=0.0))
    fixtures.randomise_adapters(model, seed=4, std=0.2)
    if quant == "moe":
        assert any(True for _ in surgery.expert_layers(model)) and any(
            ".experts." in n for n, _ in surgery.adapter_parameters(model))
    model.train()
    batch = pair_batch()
    with torch.no_grad():
        set_active_adapter(model, None)
        base = full_logits_logps(model, batch).sum(1)
        set_active_adapter(model, "default")
    ref_c, ref_r = reference_logps(model, batch)
    n = int(batch["attention_mask"].sum()) * (HIDDEN + VOCAB)
    torch.testing.assert_close(torch.cat([ref_c, ref_r]), base, rtol=0, atol=sum_atol(n, base.abs().max()))
    loss, m = preference_step(model, batch, PreferenceConfig("dpo", beta=0.1))
    loss.backward()
    assert m["rewards/margins"] != 0.0
    for name, p in surgery.adapter_parameters(model):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_is_checked():
    with pytest.raises(ValueError, match="method must be one of dpo, orpo"):
        PreferenceConfig("kto")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        PreferenceConfig(label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        PreferenceConfig(beta=0.0)
    with pytest.raises(ValueError, match="even number of rows"):
        preference_step(adapted_dense(), {k: v[:3] for k, v in pair_batch().items()}, PreferenceConfig())


@pytest.mark.parametrize("keep_base_outputs", [False, True], ids=["full-recompute", "keep-base-outputs"])
def test_gradient_checkpointing_changes_nothing(keep_base_outputs):
    """The trainer's set-up (prepare_for_kbit_training: non-reentrant checkpointing, optionally the
    base-output tape) gives the same DPO loss and gradients as no checkpointing: the no-grad
    reference pass between does not disturb the policy's recomputation."""
    from qforge.model.surgery import adapter_parameters, prepare_for_kbit_training

    def run(prepare):
        model = fixtures.quantize_all(base_model(), compute_dtype=torch.float32)
        add_adapter(model, "default", LoraSpec(r=R, alpha=2 * R, dropout=0.0))
        fixtures.randomise_adapters(model, seed=4, std=0.2)
        if prepare:
            prepare_for_kbit_training(model, True, keep_base_outputs=keep_base_outputs)
        model.train()
        loss, _ = preference_step(model, pair_batch(), PreferenceConfig("dpo", beta=0.5))
        loss.backward()
        return loss, [p.grad for _, p in adapter_parameters(model)]

    (loss, grads), (c_loss, c_grads) = run(False), run(True)
    n = int(pair_batch()["attention_mask"].sum()) * (HIDDEN + VOCAB)
    assert float(c_loss) == pytest.approx(float(loss), abs=sum_atol(n, 1.0))
    for g, c in zip(grads, c_grads):
        torch.testing.assert_close(c, g, rtol=0, atol=sum_atol(n, g.abs().max()))


def test_a_batch_without_completion_tokens_is_refused():
    batch = pair_batch()
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no completion token in the batch"):
        preference_step(adapted_dense(), batch, PreferenceConfig())
