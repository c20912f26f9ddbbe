"""The training loop: a model, a dataset and a TrainConfig in; an adapter, metrics and
checkpoints out. Reads top to bottom: set-up, then one optimiser step per iteration.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dist import Group, fault_point
from .checkpoint import latest_checkpoint, read_checkpoint, restore_checkpoint, save_checkpoint
from .config import TrainConfig
from .loss import causal_lm_loss
from .schedule import lr_at


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)          # one per optimiser step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    output_dir: Path | None = None


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from ..optim import AdamW8bit
    return AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay, paged=cfg.optimizer.startswith("paged"))


def micro_batches(n_rows: int, cfg: TrainConfig, total_steps: int) -> list[list[int]]:
    """Every micro-batch of the run, in order: epochs of seeded shuffles, cut to what the steps use."""
    from .data import batch_order
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total_steps * cfg.grad_accum:
        order += batch_order(n_rows, cfg.batch_size, cfg.seed, epoch)
        epoch += 1
    return order[: total_steps * cfg.grad_accum]


def total_steps_for(n_rows: int, cfg: TrainConfig) -> int:
    per_epoch = math.ceil(math.ceil(n_rows / cfg.batch_size) / cfg.grad_accum)
    return cfg.max_steps or max(1, per_epoch * cfg.epochs)


def autocast(cfg: TrainConfig, device: torch.device):
    enabled = cfg.compute_dtype != "float32"
    return torch.autocast(device.type, dtype=getattr(torch, cfg.compute_dtype), enabled=enabled)


def evaluate(model, dataset, cfg: TrainConfig, pad_id: int, device) -> float:
    """Token-weighted mean loss over `dataset`."""
    from .data import collate
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(cfg, device):
        for start in range(0, len(dataset), cfg.batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += causal_lm_loss(model, batch).float().item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def train_loop(model, tokenizer, train_set, eval_set, cfg: TrainConfig, log=print, on_step=None,
               group: Group | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad. Writes checkpoints, metrics.jsonl and
    the loss-curve PNG under cfg.output_dir; resumes from the last checkpoint when cfg.resume.

    With a `group` of several processes (qforge.dist) each micro-batch of cfg.batch_size rows is
    split across the ranks, every rank's loss is weighted by its share of the global batch's
    tokens and the gradients are summed, so a step is the single-process step on the same global
    batch. Only rank 0 writes files and logs."""
    from tqdm.auto import tqdm

    from .data import collate

    group = group or Group()
    if not group.is_main:
        log = lambda *_: None  # noqa: E731
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    total_steps = total_steps_for(len(train_set), cfg)
    warmup = cfg.warmup_for(total_steps)
    schedule = micro_batches(len(train_set), cfg, total_steps)
    result = TrainResult(steps=total_steps, output_dir=out)

    start_step = 0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    last = group.broadcast(latest_checkpoint(ckpt_dir) if cfg.resume and group.is_main else None)
    if last is not None:
        state = restore_checkpoint(group.broadcast(read_checkpoint(last) if group.is_main else None),
                                   model, optimizer, group.rank)
        start_step = state["step"]
        result.losses, result.tokens = state["losses"], state["tokens"]
        result.eval_losses = [tuple(e) for e in state["eval_losses"]]
        log(f"resumed from {last} (step {start_step} of {total_steps})")
    elif cfg.resume:
        log(f"--resume: no checkpoint under {ckpt_dir}; starting from step 0")
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl" if group.is_main else os.devnull, "a" if last is not None else "w")

    def checkpoint(step: int) -> None:
        rngs = group.gather(torch.get_rng_state())
        if group.is_main:
            save_checkpoint(ckpt_dir, model, optimizer, step, {"losses": result.losses, "tokens": result.tokens,
                                                                "eval_losses": result.eval_losses}, rngs)
        group.barrier()

    interrupted = {"flag": False}
    previous_handler = signal.getsignal(signal.SIGINT)
    if threading_main():
        signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not group.is_main)
    try:
        for step in range(start_step, total_steps):
            lr = lr_at(step, total_steps, cfg.lr, warmup, cfg.min_lr_ratio, cfg.lr_scheduler)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            micro = schedule[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
            n_tok = sum(label_tokens(train_set[i] for i in idx) for idx in micro)  # the global batch's
            loss_sum, step_tokens = 0.0, 0
            for idx in micro:
                rows, weight = group.rows(idx)
                batch = {k: v.to(device) for k, v in collate([train_set[i] for i in rows], pad_id).items()}
                share = weight * int((batch["labels"][:, 1:] != -100).sum()) / max(n_tok, 1)
                with autocast(cfg, device):
                    # use_cache=False: packed rows (position_ids, no mask) stay separate only without a KV cache
                    loss = causal_lm_loss(model, batch)  # logits only where a label is
                # every rank runs backward even on a bad loss: the others wait for it in FSDP's collectives
                (loss * share).backward()
                loss_sum += loss.item() * share
                mask = batch.get("attention_mask")
                step_tokens += int(weight) * (int(mask.sum()) if mask is not None else batch["input_ids"].numel())
            loss_sum, step_tokens = group.sum([loss_sum, step_tokens])
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(f"step {step + 1}: loss is {loss_sum}; the last good checkpoint "
                                       f"under {ckpt_dir} is intact. Lower --lr or check the data.")
            result.tokens += int(step_tokens)
            group.sum_gradients(trainable)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_sum)
            record = {"step": step + 1, "loss": loss_sum, "lr": lr, "tokens": result.tokens,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "elapsed_s": time.perf_counter() - t0}
            if cfg.eval_every and eval_set is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
                record["eval_loss"] = evaluate(model, eval_set, cfg, pad_id, device)
                result.eval_losses.append((step + 1, record["eval_loss"]))
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            tok_s = (result.tokens - 0) / max(record["elapsed_s"], 1e-9)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            if on_step is not None:
                on_step(record)
            fault_point(group, step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                checkpoint(step + 1)
            if group.any(interrupted["flag"]):
                checkpoint(step + 1)
                log(f"\ninterrupted: checkpoint saved at step {step + 1}; continue with --resume")
                result.interrupted = True
                break
    finally:
        bar.close()
        metrics.close()
        if threading_main():
            signal.signal(signal.SIGINT, previous_handler)
    result.seconds = time.perf_counter() - t0
    if group.is_main:
        plot_losses(result, out / "loss.png")
    return result


def label_tokens(rows) -> int:
    """Trained tokens of `rows` as the model's loss counts them: labels after the first, not -100."""
    return sum(int((torch.as_tensor(r["labels"][1:]) != -100).sum()) for r in rows)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def plot_losses(result: TrainResult, path: Path) -> None:
    """Training loss per step (and eval loss where measured) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(result.losses) + 1), result.losses, label="train loss", lw=1)
    if result.eval_losses:
        ax.plot(*zip(*result.eval_losses), "o-", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
