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
embeddings' float32 values rounded to BF16. qforge's attention on float32 queries (BF16 inputs as
autocast gives SDPA, float32 scores, probabilities and P.V) leaves the first-step gradients at cosine
0.9983 to PEFT's; with SDPA forced, 1.0000 (summation order over 30 layers, not precision).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the statistics and the report live beside this file; the names stay importable from here
from quality_stats import (ALPHA, DROPOUT, PEER, RANK, arm_table, checkpointing_line, cosine,  # noqa: E402,F401
                           final_losses, fmt_ci, mean_ci, paired_ratios, plot, report, run_name, spread,
                           summarise, t_critical, unchanged_line)

# the main run's six arms, in the order a seed runs them (seed-major: a partial run has every arm for its first seeds)
MAIN_ARMS = ("peft-bnb-qlora", "qforge-qlora", "peft-bf16-lora", "qforge-lora", "trl-sft-qlora", "qforge-qlora-bf16res")
VARIANTS = MAIN_ARMS + ("qforge-qlora-f32res", "qforge-qlora-bf16")
PEFT_ARMS = ("peft-bnb-qlora", "peft-bf16-lora")
QUANT = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
INIT_SEED = 1234
PEFT_PREFIX = "base_model.model."
EVAL_SECONDS: list[float] = []  # each eval_loss call's wall time, in order (the first is step 0's)
EVAL_CPU_SECONDS: list[float] = []  # and its CPU time (one thread: the time it takes on an idle core)


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


if __name__ == "__main__":
    main()
