"""Training quality with real spread: qforge QLoRA (as shipped) beside PEFT QLoRA, PEFT BF16 LoRA,
TRL's SFTTrainer QLoRA recipe, qforge's previous BF16-residual default and qforge BF16 LoRA, over
seeds that vary the adapter init, the data order and dropout.

    .venv/bin/python benchmarks/train_quality.py [--steps 100 | --epochs 1] [--lrs 2e-4] [--batch-size 4]
        [--eval-every 50] [--variants ...] [--seeds 0,1,2,3,4] [--jobs 2] [--no-checkpointing]
        [--out runs/train_quality] [--report] [--check-checkpointing]

The embedded model (SmolLM2-135M-Instruct) on the demo task (qforge/data/demo_task: train.jsonl's
800 rows to train, val.jsonl's 100 rows to evaluate), LoRA r=16 / alpha 32 / dropout 0.05 on every
linear layer but lm_head, `--batch-size` rows (~80 tokens each) a step, 8-bit AdamW (weight decay 0,
gradient clipping at 1.0), the demo recipe's schedule (5% linear warmup, cosine to 10% of the
peak), bf16 autocast, `--steps` steps (or `--epochs` passes of ceil(800 / batch) steps) at each
learning rate of `--lrs`. Every arm loads the same 4-bit base: PEFT and TRL load qforge's cached
bitsandbytes-format folder of the model (NF4, double quantisation, block 64, quantised from the
float32 weights), the very tensors qforge trains on; the BF16 LoRA arms the float32 folder in BF16.

What a seed varies (arms that share a seed are paired):
  - the adapter init: A drawn from a generator seeded with INIT_SEED + seed (PEFT's kaiming-uniform,
    bound 1/sqrt(in)), layer by layer in name order, copied into every arm by layer name; B = 0;
  - the data order: qforge.train.loop.micro_batches with cfg.seed = seed (seeded shuffles per
    epoch), the same batches in the same order in every arm (TRL's too, see below);
  - the dropout masks: torch seeded with the seed just before the first training forward.

    arm                   what
    peft-bnb-qlora        PEFT's documented QLoRA recipe: prepare_model_for_kbit_training (float32
                          norms and embeddings, checkpointing), LoraConfig(target_modules="all-linear"),
                          float32 adapters, bitsandbytes' Linear4bit and AdamW8bit, `model(**batch).loss`,
                          in this script's loop (qforge's schedule, clipping and batches): the reference
    qforge-qlora          `qforge train --method qlora` as shipped: residual_dtype "auto" = a float32
                          residual stream, float32 adapters computed in BF16 (qforge.train.loop.train_loop)
    peft-bf16-lora        PEFT LoRA on the BF16 base as PEFT documents it: the model loaded in bfloat16,
                          get_peft_model with the same LoraConfig (float32 adapters), checkpointing with
                          input gradients, this script's loop, bf16 autocast, AdamW8bit
    qforge-lora           `qforge train --method lora` (the same adapters on a frozen BF16 base)
    trl-sft-qlora         TRL's SFTTrainer with its documented QLoRA recipe: the 4-bit folder loaded
                          through transformers, peft_config=LoraConfig(same r/alpha/dropout, all-linear),
                          SFTConfig(optim="paged_adamw_8bit", bf16=True, the same lr, warmup steps,
                          lr_scheduler_type="cosine_with_min_lr" with min_lr_rate 0.1, weight decay 0,
                          max_grad_norm 1.0, batch size, max_steps, seed), prompt/completion
                          conversational rows (completion-only loss, TRL applies the chat template).
                          The seed's A is copied into the LoRA A weights after SFTTrainer built the PEFT
                          model; the rows are laid out in micro_batches' order and a sequential sampler
                          (a subclass's _get_train_sampler) feeds them, so the batches are the other
                          arms'. Eval at the same steps through a TrainerCallback. As TRL ships: it keeps
                          the adapters in BF16 under bf16=True, and bitsandbytes falls back from paged to
                          plain 8-bit AdamW on the CPU (its warning); HF's warmup starts at lr 0 where
                          qforge's starts at lr / warmup (one step apart), and its cosine reaches the
                          floor one step after the last where qforge's reaches it at the last. TRL's
                          input ids are the other arms' (checked on row 0), but its completion mask also
                          labels the "\n" after <|im_end|> (33 labelled tokens of row 0 against 32): its
                          train losses average one more, easy, token a row and read lower (step 1: 0.621
                          against qforge's 0.641 on the same batch); the eval loss is this script's, the
                          same tokens for every arm
    qforge-qlora-bf16res  qforge QLoRA with residual_dtype bfloat16 (the default before a7e7500)
    qforge-qlora-f32res   residual_dtype float32 set explicitly (the same as the default now; not in the
                          main run)
    qforge-qlora-bf16     BF16 adapters and BF16 residual (an older default; not in the main run)

The eval loss (token-weighted mean over val.jsonl, this script's eval_loss for every arm, with the
modules in train mode but dropout off) is taken at step 0 and every `--eval-every` steps.

Statistics: per arm and eval step, the mean over the seeds with its 95% Student t interval, mean -+
t(n-1) * s / sqrt(n) (s the sample standard deviation; t = 2.776 for n = 5), each seed's value, and
the paired ratio to peft-bnb-qlora: each seed's eval loss over the peer's at the same seed, the
mean of those ratios and its 95% t interval.

Gradient checkpointing recomputes the forward and changes no value; --no-checkpointing turns it off
in every arm (the CPU budget of the main run), and --check-checkpointing runs the first arm of
--variants for 3 steps with and without it in fresh processes and prints the largest relative
difference of the losses (OUT/checkpointing_check.json, printed again by the report). Measured
(batch 4, seed 0; b002049 and 8254a6e, which differ in this docstring only): qforge-qlora's 3
losses 0.640699 0.558090 0.525243 with and without, difference 0; peft-bnb-qlora's and
trl-sft-qlora's 4 losses and 3 eval losses the same to the printed digits with and without.

The matrix (every variant x lr x seed) runs at one commit in one invocation: each run a fresh
process, --jobs at a time with OMP_NUM_THREADS=--threads (1; the losses do not depend on load),
seed-major (a partial run has every arm for its first seeds), resumable: a run whose
OUT/<variant>-lr<lr>-s<seed>/record.json exists is skipped. Each record holds its commit; the
report says when they are not one.

    # the 100-step run and the one-epoch run (200 steps at batch 4)
    .venv/bin/python benchmarks/train_quality.py --steps 100 --batch-size 4 --lrs 2e-4 --eval-every 50 \
        --seeds 0,1,2,3,4 --jobs 2 --no-checkpointing --out runs/train_quality_100
    .venv/bin/python benchmarks/train_quality.py --epochs 1 --batch-size 4 --lrs 2e-4 --eval-every 50 \
        --seeds 0,1,2,3,4 --jobs 2 --no-checkpointing --out runs/train_quality_epoch
    .venv/bin/python benchmarks/train_quality.py --check-checkpointing --variants qforge-qlora \
        --out runs/train_quality_100

grad_cosine_vs_peft: before training, qforge-qlora and the peer each run one forward and backward
on the first batch (dropout off, B = 0 so only B has a gradient; same seed, same A) and the cosine
between the two sides' concatenated adapter gradients is taken. For the qforge arms the script
also counts, after every step, the adapter elements the step left unchanged (the cost of BF16
adapters: an update below half a BF16 ulp rounds away).

Writes OUT/quality.json (top-level same_config_eval_loss_vs_peft, same_config_eval_loss_ci, the other
ratios, the summary rows and every record) and OUT/train_quality.png (each arm's mean eval curve
with its 95% interval as a band). Last line:
eval_loss_vs_peft=X eval_loss_vs_bf16_lora=Y grad_cosine_vs_peft=Z peft_seed_spread=S
same_config_eval_loss_vs_peft=B same_config_eval_loss_ci=lo..hi trl_eval_loss_vs_peft=T
bf16res_eval_loss_vs_peft=R: X = qforge-qlora's (the shipped default) mean final eval loss over
peft-bnb-qlora's (the larger over the learning rates), Y the same over qforge-lora's; B = X (the
configuration whose speed train_step.py reports as the default), lo..hi the 95% interval of the
paired per-seed ratio at that learning rate; T and R as X for trl-sft-qlora and
qforge-qlora-bf16res; S the peer's own seed spread ((max - min) / mean of its final eval losses).

History (before issue 27, seeds varying dropout only, batch 4, 100 steps, 3 seeds; fbaec5b): the
BF16 residual ended 1.066x (1e-4) / 1.039x (2e-4) PEFT's eval loss, far outside the seed spread;
the float32 residual 1.002x / 0.997x. At step 0 (B = 0) PEFT and the float32 residual give the same
float, 0.6702243; half of the BF16 residual's step-0 gap was the residual's rounding, half the
embeddings' float32 values rounded to BF16. With float32 queries qforge takes SDPA: its matrix
attention's BF16 scores left the first-step gradients at cosine 0.9983 against 1.0000.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# the main run's six arms, in the order a seed runs them (seed-major: a partial run has every arm for its first seeds)
MAIN_ARMS = ("peft-bnb-qlora", "qforge-qlora", "peft-bf16-lora", "qforge-lora", "trl-sft-qlora", "qforge-qlora-bf16res")
VARIANTS = MAIN_ARMS + ("qforge-qlora-f32res", "qforge-qlora-bf16")
PEER = "peft-bnb-qlora"
PEFT_ARMS = ("peft-bnb-qlora", "peft-bf16-lora")
RANK, ALPHA, DROPOUT = 16, 32, 0.05
QUANT = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
INIT_SEED = 1234
PEFT_PREFIX = "base_model.model."
EVAL_SECONDS: list[float] = []  # each eval_loss call's wall time, in order (the first is step 0's)
EVAL_CPU_SECONDS: list[float] = []  # and its CPU time (one thread: the time it takes on an idle core)
# Student t, two-sided 95% (the 0.975 quantile), by degrees of freedom 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# ---- statistics (pure functions; tests/benchmarks/test_train_quality.py checks them by hand) -----------
def t_critical(df: int) -> float:
    """The two-sided 95% Student t quantile for `df` degrees of freedom (df > 30: 2.042, df 30's,
    slightly wide)."""
    if df < 1:
        return float("nan")
    return T975[min(df, len(T975)) - 1]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% Student t interval, mean -+ t(n-1) * s / sqrt(n) with
    s the sample standard deviation (n - 1 in the denominator). One value: the interval is nan."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan"), float("nan")
    s = math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))
    h = t_critical(n - 1) * s / math.sqrt(n)
    return m, m - h, m + h


def paired_ratios(num: dict, den: dict) -> list[float]:
    """num[seed] / den[seed] for every seed both ran (in seed order): arms that share a seed share
    A and the batch order, so the ratio of a pair removes what the seed changes for both."""
    return [num[s] / den[s] for s in sorted(set(num) & set(den))]


def spread(values: list[float]) -> float:
    """(max - min) / mean: the seed-to-seed spread as a share of the mean (0 for one seed)."""
    return (max(values) - min(values)) / (sum(values) / len(values)) if values else float("nan")


# ---- shared pieces ------------------------------------------------------------------------------
def train_config(variant: str, lr: float, steps: int, batch_size: int, out: Path, seed: int = 0,
                 checkpointing: bool = True):
    """The run's TrainConfig (every arm reads its settings from it). seed orders the batches
    (qforge.train.loop.micro_batches) and seeds torch; residual_dtype "auto" is the shipped default
    (float32 for qlora/lora)."""
    from qforge.eval.tasks import demo_task_paths
    from qforge.train.config import TrainConfig
    paths = demo_task_paths()
    residual = {"qforge-qlora-bf16res": "bfloat16", "qforge-qlora-bf16": "bfloat16",
                "qforge-qlora-f32res": "float32"}.get(variant, "auto")
    return TrainConfig(model="smollm2", data=str(paths["train"]), eval_data=str(paths["val"]),
                       method="lora" if variant in ("qforge-lora", "peft-bf16-lora") else "qlora", rank=RANK,
                       alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear", lr=lr, weight_decay=0.0,
                       warmup_ratio=0.05, min_lr_ratio=0.1, lr_scheduler="cosine", max_grad_norm=1.0,
                       max_steps=steps, batch_size=batch_size, max_seq_len=256, eval_every=0, save_every=0,
                       seed=seed, adapter_dtype="bfloat16" if variant == "qforge-qlora-bf16" else "float32",
                       residual_dtype=residual, gradient_checkpointing=checkpointing, output_dir=str(out),
                       device="cpu")


def lora_modules(model) -> dict:
    """Layer path (as in the base model: model.layers.0.self_attn.q_proj) -> (A, B) parameters."""
    from torch import nn
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "adapters") and "default" in getattr(module, "adapters", {}):  # qforge
            a = module.adapters["default"]
            out[name] = (a.lora_A.weight, a.lora_B.weight)
        elif isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and "default" in module.lora_A:  # PEFT
            out[name.removeprefix(PEFT_PREFIX)] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return out


def shared_start(model, seed: int = 0) -> None:
    """A from a generator seeded with INIT_SEED + seed, layer by layer in name order (PEFT's
    kaiming-uniform, bound 1/sqrt(in)), copied into whichever side this is; B = 0. Every arm of one
    seed starts from the same A."""
    import torch
    gen = torch.Generator().manual_seed(INIT_SEED + seed)
    with torch.no_grad():
        for name, (A, B) in sorted(lora_modules(model).items()):
            bound = 1.0 / math.sqrt(A.shape[1])
            A.copy_((torch.rand(A.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound)
            B.zero_()


def first_gradients(model, batch, loss_fn) -> dict:
    """Adapter gradients of one forward + backward on `batch`, dropout off; grads cleared after."""
    import torch
    from qforge.nn.dropout import HashDropout
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, HashDropout)):
            m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(batch)
    loss.backward()
    grads = {}
    for name, (A, B) in lora_modules(model).items():
        grads[name + ".lora_A"] = A.grad.detach().float().clone()
        grads[name + ".lora_B"] = B.grad.detach().float().clone()
    model.zero_grad(set_to_none=True)
    model.train()
    return grads


def unchanged_elements(before: dict, after: dict) -> dict:
    """{"A": (unchanged, total), "B": (...)}: adapter elements equal before and after a step."""
    counts = {"A": [0, 0], "B": [0, 0]}
    for name, (a0, b0) in before.items():
        a1, b1 = after[name]
        for key, old, new in (("A", a0, a1), ("B", b0, b1)):
            counts[key][0] += int((old == new).sum())
            counts[key][1] += old.numel()
    return {k: tuple(v) for k, v in counts.items()}


def snapshot(model) -> dict:
    return {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in lora_modules(model).items()}


def eval_loss(model, dataset, cfg, pad_id: int) -> float:
    """Token-weighted mean loss over `dataset` (qforge.train.loss.causal_lm_loss, bf16 autocast), the
    same function for every variant. The modules stay in train mode with only the dropouts off:
    bitsandbytes' Linear4bit repacks its weight in place for inference after an eval-mode forward,
    and the training forwards after that lose their input gradients silently (measured: PEFT then
    barely trains), so no variant is put in eval mode."""
    import torch
    from qforge.nn.dropout import HashDropout
    from qforge.train.data import collate
    from qforge.train.loss import causal_lm_loss
    t0, c0 = time.perf_counter(), time.process_time()
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, HashDropout)):
            m.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for start in range(0, len(dataset), cfg.batch_size):
                batch = collate([dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))], pad_id)
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += causal_lm_loss(model, batch).float().item() * n
                count += n
    finally:
        for m, training in modes.items():
            m.training = training
    EVAL_SECONDS.append(time.perf_counter() - t0)
    EVAL_CPU_SECONDS.append(time.process_time() - c0)
    return total / max(count, 1)


def data_for(cfg, tok):
    from qforge.train.data import build_dataset
    train, val, _ = build_dataset(cfg.data, tok, max_seq_len=cfg.max_seq_len, eval_path=cfg.eval_data, seed=cfg.seed)
    return train, val


# ---- children -----------------------------------------------------------------------------------
def seed_first_forward(model, seed: int) -> None:
    """torch.manual_seed(seed) just before the next forward's embedding lookup (qforge's loop seeds
    torch with cfg.seed too, but the first-gradient pass and the step-0 eval run in between; this
    makes the dropout masks depend on the seed alone). The embedding runs once per step, outside the
    checkpointed layers."""
    import torch
    emb = model.get_input_embeddings()

    def hook(module, args):
        torch.manual_seed(seed)
        handle.remove()
    handle = emb.register_forward_pre_hook(hook)


def child_qforge(variant: str, cfg, eval_every: int, out: Path, seed: int = 0) -> dict:
    import torch
    from qforge.train.data import collate
    from qforge.train.loop import micro_batches, total_steps_for, train_loop
    from qforge.train.loss import causal_lm_loss
    from qforge.train.run import load_for_method

    device = torch.device("cpu")
    model, tok = load_for_method(cfg, device)
    shared_start(model, seed)
    train, val = data_for(cfg, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    first = micro_batches(len(train), cfg, total_steps_for(len(train), cfg))[0]
    grads = first_gradients(model, collate([train[i] for i in first], pad), lambda b: causal_lm_loss(model, b))
    torch.save(grads, out / "first_grads.pt")
    curve = [(0, eval_loss(model, val, cfg, pad))]
    unchanged, prev = [], [snapshot(model)]

    def on_step(rec: dict) -> None:
        now = snapshot(model)
        unchanged.append(unchanged_elements(prev[0], now))
        prev[0] = now
        if rec["step"] % eval_every == 0 or rec["step"] == cfg.max_steps:
            curve.append((rec["step"], eval_loss(model, val, cfg, pad)))
            print(f"{variant} lr {cfg.lr:g} s{seed}: step {rec['step']} loss {rec['loss']:.4f} eval {curve[-1][1]:.4f}",
                  file=sys.stderr, flush=True)

    seed_first_forward(model, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train_loop(model, tok, train, val, cfg, log=lambda *_: None, on_step=on_step, device=device)
    A, B = next(iter(lora_modules(model).values()))
    return {"losses": result.losses, "eval_curve": curve, "unchanged": unchanged, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "adapter_dtype": str(A.dtype).removeprefix("torch."), "tokens": result.tokens}


def build_peft(cfg, quantized: bool = True):
    """PEFT as documented: QLoRA = the 4-bit folder + prepare_model_for_kbit_training; BF16 LoRA =
    the float32 folder loaded in bfloat16 (+ gradient checkpointing and input gradients when on).
    LoraConfig(target_modules="all-linear"); get_peft_model keeps the adapters float32."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qforge.model.load import smollm2_folder, smollm2_quantized_folder

    folder = smollm2_quantized_folder(QUANT) if quantized else smollm2_folder()  # the tensors qforge trains on
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16)
    ckpt_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def child_peft(cfg, eval_every: int, out: Path, seed: int = 0, quantized: bool = True) -> dict:
    import bitsandbytes as bnb
    import torch
    from qforge.train.data import collate
    from qforge.train.loop import micro_batches, total_steps_for
    from qforge.train.schedule import lr_at

    model, tok = build_peft(cfg, quantized)
    shared_start(model, seed)
    train, val = data_for(cfg, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total = total_steps_for(len(train), cfg)
    order = micro_batches(len(train), cfg, total)  # the same batches, in the same order, as qforge's loop
    grads = first_gradients(model, collate([train[i] for i in order[0]], pad),
                            lambda b: model(**b, use_cache=False).loss)
    torch.save(grads, out / "first_grads.pt")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve = [(0, eval_loss(model, val, cfg, pad))]
    warmup = cfg.warmup_for(total)
    losses, tokens = [], 0
    model.train()
    torch.manual_seed(seed)  # the dropout masks' RNG (A, the batches and the eval do not draw from it)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg.lr, warmup, cfg.min_lr_ratio, cfg.lr_scheduler)
        batch = collate([train[i] for i in order[step]], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if (step + 1) % eval_every == 0 or step + 1 == total:
            curve.append((step + 1, eval_loss(model, val, cfg, pad)))
            print(f"peft lr {cfg.lr:g} s{seed}: step {step + 1} loss {losses[-1]:.4f} eval {curve[-1][1]:.4f}",
                  file=sys.stderr, flush=True)
    A, _ = next(iter(lora_modules(model).values()))
    return {"losses": losses, "eval_curve": curve, "unchanged": [], "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "adapter_dtype": str(A.dtype).removeprefix("torch."), "tokens": tokens,
            "residual_dtype": residual_of(model)}


def residual_of(model) -> str:
    """The dtype a transformers model's residual stream starts in: its input embedding's weight."""
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def trl_rows(path, order: list[list[int]]) -> list[dict]:
    """The chat rows of `path` as TRL's conversational prompt/completion rows (prompt: every message
    but the last; completion: the assistant's reply), laid out in the order the batches take them."""
    raw = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{"prompt": raw[i]["messages"][:-1], "completion": raw[i]["messages"][-1:]}
            for batch in order for i in batch]


def child_trl(cfg, eval_every: int, out: Path, seed: int = 0) -> dict:
    """TRL's SFTTrainer with its documented QLoRA recipe (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from qforge.model.load import smollm2_quantized_folder
    from qforge.train.loop import micro_batches, total_steps_for

    folder = smollm2_quantized_folder(QUANT)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train, val = data_for(cfg, tok)  # this script's tokenisation: the eval, and the row count for the order
    pad = tok.pad_token_id
    total = total_steps_for(len(train), cfg)
    order = micro_batches(len(train), cfg, total)
    if any(len(b) != cfg.batch_size for b in order):
        raise SystemExit(f"trl-sft-qlora: a short batch in the order ({len(train)} rows, batch {cfg.batch_size}); "
                         "a sequential sampler would shift every later batch")
    args = SFTConfig(
        output_dir=str(out / "trl"), max_steps=total, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1, learning_rate=cfg.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio}, warmup_steps=cfg.warmup_for(total),
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="paged_adamw_8bit", bf16=True,
        use_cpu=True, seed=seed, data_seed=seed, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=cfg.max_seq_len,
        completion_only_loss=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    curve, losses, seen = [], [], [0]

    class EvalAt(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0 or state.global_step == total:
                curve.append((state.global_step, eval_loss(model, val, cfg, pad)))
                print(f"trl lr {cfg.lr:g} s{seed}: step {state.global_step} eval {curve[-1][1]:.4f}",
                      file=sys.stderr, flush=True)

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                seen[0] = int(float(logs.get("num_tokens", 0)))

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):  # the rows are already in micro_batches' order
            data = train_dataset if train_dataset is not None else self.train_dataset
            return torch.utils.data.SequentialSampler(data)

    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(trl_rows(cfg.data, order)),
                      processing_class=tok, callbacks=[EvalAt()],
                      peft_config=LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    shared_start(trainer.model, seed)
    curve.append((0, eval_loss(trainer.model, val, cfg, pad)))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    A, _ = next(iter(lora_modules(trainer.model).values()))
    return {"losses": losses, "eval_curve": curve, "unchanged": [], "seconds": seconds, "cpu_seconds": cpu_seconds,
            "adapter_dtype": str(A.dtype).removeprefix("torch."), "tokens": seen[0],
            "residual_dtype": residual_of(trainer.model)}


def commit_of_tree() -> str:
    """HEAD of the checkout this script runs from, with "+dirty" when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def child(variant: str, lr: float, seed: int, steps: int, batch_size: int, eval_every: int, out: Path,
          checkpointing: bool = True) -> None:
    import torch
    commit = commit_of_tree()  # the code this process loaded (read before it runs for minutes)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = train_config(variant, lr, steps, batch_size, out, seed, checkpointing)
    if variant in PEFT_ARMS:
        record = child_peft(cfg, eval_every, out, seed, quantized=variant == "peft-bnb-qlora")
    elif variant == "trl-sft-qlora":
        record = child_trl(cfg, eval_every, out, seed)
    else:
        record = child_qforge(variant, cfg, eval_every, out, seed)
    # the training steps' own time: the evals after step 0 ran inside the timed loop
    step_seconds = (record["seconds"] - sum(EVAL_SECONDS[1:])) / max(cfg.max_steps, 1)
    record.update(variant=variant, lr=lr, seed=seed, batch_size=batch_size, steps=cfg.max_steps,
                  eval_seconds=EVAL_SECONDS, step_seconds=step_seconds, eval_cpu_seconds=EVAL_CPU_SECONDS,
                  step_cpu_seconds=(record["cpu_seconds"] - sum(EVAL_CPU_SECONDS[1:])) / max(cfg.max_steps, 1),
                  threads=torch.get_num_threads(), checkpointing=checkpointing, commit=commit)
    record.setdefault("residual_dtype", cfg.residual_dtype)
    tmp = out / "record.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out / "record.json")  # atomic: a record that exists is complete (the resume skips it)


# ---- the parent ---------------------------------------------------------------------------------
def cosine(a: dict, b: dict) -> float:
    import torch
    keys = sorted(a)
    if sorted(b) != keys:
        raise SystemExit(f"the two sides adapt different layers: {sorted(set(a) ^ set(b))[:4]}")
    x = torch.cat([a[k].flatten() for k in keys]).double()  # float32 sums over 10M terms overshoot 1.0
    y = torch.cat([b[k].flatten() for k in keys]).double()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def unchanged_line(record: dict) -> str:
    rows = record["unchanged"]
    if not rows:
        return ""
    pick = [s for s in (1, 2, 3, 5, 10, 25, 50, len(rows)) if s <= len(rows)]
    parts = []
    for s in dict.fromkeys(pick):
        u = rows[s - 1]
        parts.append(f"step {s}: A {u['A'][0] / u['A'][1]:.1%} B {u['B'][0] / u['B'][1]:.1%}")
    later = rows[1:] or rows
    mean_a = sum(u["A"][0] / u["A"][1] for u in later) / len(later)
    mean_b = sum(u["B"][0] / u["B"][1] for u in later) / len(later)
    return "; ".join(parts) + f"; mean over steps 2-{len(rows)}: A {mean_a:.1%} B {mean_b:.1%}"


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}-lr{lr:g}-s{seed}"


def child_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def child_cmd(v: str, lr: float, seed: int, steps: int, args, out: Path, checkpointing: bool) -> list[str]:
    cmd = [sys.executable, __file__, "--child", v, f"{lr:g}", str(seed), "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every), "--out", str(out)]
    return cmd + ([] if checkpointing else ["--no-checkpointing"])


def run_matrix(jobs: list[tuple[str, float, int]], steps: int, args, out: Path) -> list[str]:
    """Run every (variant, lr, seed) in `jobs` as a fresh process, args.jobs at a time, each with
    OMP_NUM_THREADS=args.threads, in the order given; skip those whose record.json exists (resume).
    Returns the failures (each its log's path)."""
    env = dict(child_env(), OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    pending = [j for j in jobs if not (out / run_name(*j) / "record.json").is_file()]
    if len(pending) < len(jobs):
        print(f"resuming: {len(jobs) - len(pending)} of {len(jobs)} runs have their record already", flush=True)
    running: dict = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            v, lr, seed = pending.pop(0)
            log_path = out / f"{run_name(v, lr, seed)}.log"
            log = open(log_path, "w")
            proc = subprocess.Popen(child_cmd(v, lr, seed, steps, args, out, not args.no_checkpointing), env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running[proc] = (v, lr, seed, time.perf_counter(), log, log_path)
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            v, lr, seed, t0, log, log_path = running.pop(proc)
            log.close()
            ok = proc.returncode == 0 and (out / run_name(v, lr, seed) / "record.json").is_file()
            print(f"{'ran' if ok else 'FAILED'} {v} lr {lr:g} seed {seed} in {time.perf_counter() - t0:.0f} s"
                  + ("" if ok else f" (exit {proc.returncode}; {log_path})"), flush=True)
            if not ok:
                print(log_path.read_text()[-2000:], file=sys.stderr)
                failed.append(str(log_path))
    return failed


def check_checkpointing(variant: str, lr: float, args, out: Path) -> dict:
    """Run `variant` for 3 steps (seed 0) with and without gradient checkpointing, each a fresh
    process; checkpointing recomputes the forward, so the training losses should agree to float
    rounding. Writes OUT/checkpointing_check.json and returns it."""
    env = dict(child_env(), OMP_NUM_THREADS=str(args.threads))
    losses = {}
    for on in (True, False):
        sub = out / ("ckpt-on" if on else "ckpt-off")
        sub.mkdir(parents=True, exist_ok=True)
        cmd = child_cmd(variant, lr, 0, 3, argparse.Namespace(batch_size=args.batch_size, eval_every=3), sub, on)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rec = sub / run_name(variant, lr, 0) / "record.json"
        if proc.returncode != 0 or not rec.is_file():
            print(proc.stdout[-3000:], file=sys.stderr)
            raise SystemExit(f"--check-checkpointing: {variant} failed (exit {proc.returncode})")
        losses[on] = json.loads(rec.read_text())["losses"]
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))
    result = {"variant": variant, "lr": lr, "steps": 3, "with": losses[True], "without": losses[False],
              "max_rel_diff": diff, "commit": commit_of_tree()}
    (out / "checkpointing_check.json").write_text(json.dumps(result))
    return result


def checkpointing_line(check: dict) -> str:
    return (f"gradient checkpointing on / off, {check['variant']} lr {check['lr']:g} seed 0, 3 steps: losses "
            f"{[round(x, 6) for x in check['with']]} / {[round(x, 6) for x in check['without']]}, "
            f"largest relative difference {check['max_rel_diff']:.2e}")


def arm_table(records: list[dict]) -> dict:
    """(variant, lr) -> {step: {seed: eval loss}}."""
    table: dict = {}
    for r in records:
        for step, loss in r["eval_curve"]:
            table.setdefault((r["variant"], r["lr"]), {}).setdefault(step, {})[r.get("seed", 0)] = loss
    return table


def summarise(records: list[dict]) -> list[dict]:
    """One row per (arm, lr, eval step): n, mean, 95% interval, per-seed values, and the paired ratio
    to peft-bnb-qlora (mean and 95% interval of the per-seed ratios) where the peer ran."""
    table = arm_table(records)
    rows = []
    for (v, lr), by_step in table.items():
        for step in sorted(by_step):
            vals = by_step[step]
            m, lo, hi = mean_ci([vals[s] for s in sorted(vals)])
            peer = table.get((PEER, lr), {}).get(step, {})
            rat = paired_ratios(vals, peer) if v != PEER else []
            rm, rlo, rhi = mean_ci(rat)
            rows.append({"variant": v, "lr": lr, "step": step, "n": len(vals), "mean": m, "ci": [lo, hi],
                         "seeds": {str(s): vals[s] for s in sorted(vals)}, "ratio_vs_peft": rm,
                         "ratio_ci": [rlo, rhi], "pairs": len(rat)})
    return rows


def plot(summary: list[dict], lrs: list[float], path: Path) -> None:
    """Eval loss against step, one panel per learning rate: each arm's mean over the seeds, its 95%
    interval as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(lrs), figsize=(7 * len(lrs), 4.8), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for v in dict.fromkeys(r["variant"] for r in summary if r["lr"] == lr):
            rows = [r for r in summary if r["lr"] == lr and r["variant"] == v]
            steps = [r["step"] for r in rows]
            line, = ax.plot(steps, [r["mean"] for r in rows], "o-", ms=3, lw=1.4, label=f"{v} (n={rows[-1]['n']})")
            if all(not math.isnan(r["ci"][0]) for r in rows):
                ax.fill_between(steps, [r["ci"][0] for r in rows], [r["ci"][1] for r in rows],
                                color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("eval loss (log scale)")
        ax.set_title(f"SmolLM2-135M, demo task, lr {lr:g}: mean and 95% interval over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_records(out: Path, variants: list[str], lrs: list[float], seeds: list[int]) -> list[dict]:
    records = []
    for seed in seeds:
        for lr in lrs:
            for v in variants:
                path = out / run_name(v, lr, seed) / "record.json"
                if path.is_file():
                    records.append(json.loads(path.read_text()))
    return records


def one_epoch_steps(batch_size: int, epochs: int) -> int:
    """Steps of `epochs` passes over the demo task's train.jsonl at `batch_size`: ceil(rows / batch) each."""
    from qforge.eval.tasks import demo_task_paths
    rows = sum(1 for line in Path(demo_task_paths()["train"]).read_text().splitlines() if line.strip())
    return math.ceil(rows / batch_size) * epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps per run (default: 100)")
    ap.add_argument("--epochs", type=int, default=0,
                    help="instead of --steps: this many passes over train.jsonl, ceil(rows / batch) steps each "
                         "(default: 0, use --steps)")
    ap.add_argument("--lrs", default="2e-4", help="peak learning rates, comma-separated (default: 2e-4)")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per step (default: 4)")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between eval losses (default: 50)")
    ap.add_argument("--variants", default=",".join(MAIN_ARMS),
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default: the six main arms)")
    ap.add_argument("--seeds", default="0,1,2,3,4",
                    help="seeds, comma-separated: each seeds A's init, the batch order and the dropout masks; "
                         "arms of one seed are paired (default: 0,1,2,3,4)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each a fresh process (default: 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of each run; the losses do not depend on it (default: 1)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="train without gradient checkpointing on every arm (same values, less recompute; "
                         "--check-checkpointing shows it; default: checkpointing on, as the recipes ship)")
    ap.add_argument("--check-checkpointing", action="store_true",
                    help="only run the first variant for 3 steps with and without checkpointing and compare "
                         "the losses (default: off)")
    ap.add_argument("--out", default="runs/train_quality", help="output folder (default: runs/train_quality)")
    ap.add_argument("--report", action="store_true",
                    help="only print the report from the records an earlier run left in --out (default: off)")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "LR", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.child:
        v, lr, seed = args.child[0], float(args.child[1]), int(args.child[2])
        return child(v, lr, seed, args.steps, args.batch_size, args.eval_every, out / run_name(v, lr, seed),
                     not args.no_checkpointing)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--lrs / --seeds: expected comma-separated numbers, got {args.lrs!r} / {args.seeds!r}"
                         ) from None
    if not seeds or not lrs:
        raise SystemExit("--seeds / --lrs: at least one value is needed")
    if args.jobs < 1 or args.threads < 1 or args.batch_size < 1 or args.eval_every < 1 or args.epochs < 0:
        raise SystemExit("--jobs, --threads, --batch-size, --eval-every: expected whole numbers >= 1 (--epochs >= 0)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--variants: unknown {bad or variants} (known: {', '.join(VARIANTS)})")
    steps = one_epoch_steps(args.batch_size, args.epochs) if args.epochs else args.steps
    from qforge.model.load import smollm2_folder, smollm2_quantized_folder
    smollm2_folder()
    smollm2_quantized_folder(QUANT)  # built once, before any child
    out.mkdir(parents=True, exist_ok=True)
    if args.check_checkpointing:
        print(checkpointing_line(check_checkpointing(variants[0], lrs[0], args, out)))
        return
    failed = []
    if not args.report:
        jobs = [(v, lr, seed) for seed in seeds for lr in lrs for v in variants]  # seed-major
        print(f"{len(jobs)} runs of {steps} steps at commit {commit_of_tree()}, {args.jobs} at a time", flush=True)
        failed = run_matrix(jobs, steps, args, out)
    report(load_records(out, variants, lrs, seeds), args, lrs, out)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {', '.join(failed)}")


def final_losses(records: list[dict]) -> dict:
    """(variant, lr) -> {seed: final eval loss}."""
    finals: dict = {}
    for r in records:
        finals.setdefault((r["variant"], r["lr"]), {})[r.get("seed", 0)] = r["eval_curve"][-1][1]
    return finals


def fmt_ci(m: float, ci: list[float], digits: int = 4) -> str:
    if math.isnan(ci[0]):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def report(records: list[dict], args, lrs: list[float], out: Path) -> None:
    """Print the tables and the last line, write quality.json and the PNG."""
    import torch
    commits = sorted({r.get("commit", "unknown") for r in records})
    steps = sorted({r.get("steps", len(r["losses"])) for r in records})
    batch = sorted({r.get("batch_size", args.batch_size) for r in records})
    ckpt = sorted({r.get("checkpointing", True) for r in records})
    print(f"\nSmolLM2-135M-Instruct, demo task, {steps} steps of {batch} rows, r={RANK} alpha={ALPHA} "
          f"dropout={DROPOUT}, all linear layers, 8-bit AdamW, bf16 autocast, gradient checkpointing {ckpt}; "
          f"per seed: A init, batch order and dropout masks; same 4-bit base (NF4 + double quant from the float32 "
          f"weights); commits {commits}" + ("  <- NOT ONE COMMIT" if len(commits) > 1 else ""))
    check_path = out / "checkpointing_check.json"
    check = json.loads(check_path.read_text()) if check_path.is_file() else None
    if check:
        print(checkpointing_line(check))
    print("\n| variant | lr | seed | adapter dtype | residual dtype | s/step (CPU s/step) | first losses "
          "| final train loss (mean of last 10) | eval loss by step |")
    print("|---|---:|---:|---|---|---:|---|---:|---|")
    for r in records:
        curve = ", ".join(f"{s}: {e:.4f}" for s, e in r["eval_curve"])
        tail = r["losses"][-10:] or [float("nan")]
        print(f"| {r['variant']} | {r['lr']:g} | {r.get('seed', 0)} | {r['adapter_dtype']} "
              f"| {r.get('residual_dtype', '?')} | {r.get('step_seconds', float('nan')):.2f} "
              f"({r.get('step_cpu_seconds', float('nan')):.2f}) "
              f"| {[round(x, 4) for x in r['losses'][:3]]} | {sum(tail) / len(tail):.4f} | {curve} |")
    print("\nadapter elements a step leaves unchanged (share of all A / B elements):")
    for r in records:
        if r["unchanged"]:
            print(f"  {r['variant']:<22} lr {r['lr']:g} s{r.get('seed', 0)} ({r['adapter_dtype']}): "
                  f"{unchanged_line(r)}")
    summary = summarise(records)
    print("\neval loss over the seeds: mean [95% t interval], each seed's; paired ratio to peft-bnb-qlora = mean "
          "[95% interval] of the per-seed ratios (same seed: same A, same batch order)")
    print("| variant | lr | step | n | mean [95% CI] | per seed | paired ratio vs peft-bnb-qlora [95% CI] |")
    print("|---|---:|---:|---:|---|---|---|")
    for row in summary:
        ratio = fmt_ci(row["ratio_vs_peft"], row["ratio_ci"]) + f" (n={row['pairs']})" if row["pairs"] else "-"
        print(f"| {row['variant']} | {row['lr']:g} | {row['step']} | {row['n']} | {fmt_ci(row['mean'], row['ci'])} "
              f"| {' '.join(f'{x:.4f}' for x in row['seeds'].values())} | {ratio} |")
    finals = final_losses(records)

    def worst(num: str, den: str = PEER) -> tuple[float, float | None]:
        """The larger ratio of the means over the learning rates, and the lr it came from; each mean over
        the seeds both arms have (a partial matrix gives unequal seed sets, which must not be mixed)."""
        pairs = []
        for lr in lrs:
            a, b = finals.get((num, lr), {}), finals.get((den, lr), {})
            common = sorted(set(a) & set(b))
            if common:
                pairs.append((sum(a[s] for s in common) / sum(b[s] for s in common), lr))
        return max(pairs) if pairs else (float("nan"), None)

    firsts = {}
    for r in records:  # the first seed where both sides left first-step gradients (same seed: same A)
        path = out / run_name(r["variant"], r["lr"], r.get("seed", 0)) / "first_grads.pt"
        if path.is_file():
            firsts.setdefault((r["variant"], r["lr"], r.get("seed", 0)), path)
    grad_cos = float("nan")
    for (v, lr, seed), path in firsts.items():
        peer = firsts.get((PEER, lr, seed))
        if v.startswith("qforge-qlora") and peer is not None:
            c = cosine(torch.load(path), torch.load(peer))
            print(f"first-step adapter gradient cosine, {v} vs {PEER} (lr {lr:g}, seed {seed}): {c:.6f}")
            if v == "qforge-qlora" and math.isnan(grad_cos):
                grad_cos = c
    peer_spread = max((spread(list(finals[(PEER, lr)].values())) for lr in lrs if (PEER, lr) in finals),
                      default=float("nan"))
    x, x_lr = worst("qforge-qlora")
    y, _ = worst("qforge-qlora", "qforge-lora")
    trl, _ = worst("trl-sft-qlora")
    bf16res, _ = worst("qforge-qlora-bf16res")
    same_rows = [r for r in summary if r["variant"] == "qforge-qlora" and r["lr"] == x_lr]
    same = max(same_rows, key=lambda r: r["step"]) if same_rows else None  # the final step's paired ratio
    ci = same["ratio_ci"] if same else [float("nan")] * 2
    if records:
        plot(summary, lrs, out / "train_quality.png")
    tmp = out / "quality.json.tmp"
    num = lambda v: None if v is None or math.isnan(v) else v  # noqa: E731 (null, not NaN, for other readers)
    tmp.write_text(json.dumps({
        "same_config_eval_loss_vs_peft": num(x), "same_config_eval_loss_ci": [num(ci[0]), num(ci[1])],
        "eval_loss_vs_peft": num(x), "eval_loss_vs_bf16_lora": num(y), "trl_eval_loss_vs_peft": num(trl),
        "bf16res_eval_loss_vs_peft": num(bf16res), "grad_cosine_vs_peft": num(grad_cos),
        "peft_seed_spread": num(peer_spread), "commits": commits,
        "checkpointing_check": check, "summary": summary, "records": records}))
    os.replace(tmp, out / "quality.json")
    print(f"eval_loss_vs_peft={x:.4f} eval_loss_vs_bf16_lora={y:.4f} grad_cosine_vs_peft={grad_cos:.4f} "
          f"peft_seed_spread={peer_spread:.4f} same_config_eval_loss_vs_peft={x:.4f} "
          f"same_config_eval_loss_ci={ci[0]:.4f}..{ci[1]:.4f} trl_eval_loss_vs_peft={trl:.4f} "
          f"bf16res_eval_loss_vs_peft={bf16res:.4f}")


if __name__ == "__main__":
    main()
