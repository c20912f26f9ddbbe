"""The training loop: a model, a dataset and a TrainConfig in; an adapter, metrics and
checkpoints out. Reads top to bottom: set-up, then one optimiser step per iteration.

The objective (cfg.objective) decides what a row is and how a micro-batch becomes a loss:
    sft      rows of tokens; loss = causal_lm_loss; a micro-batch weighs its trained tokens
    dpo/orpo rows are preference pairs (qforge.train.preference_data); a micro-batch of B pairs is
             one batch of 2B sequences (chosen, then rejected); loss = preference_step, whose
             metrics (TRL's names: rewards/*, logps/*, ORPO's nll_loss and log_odds_*) go into every
             step's record; a micro-batch weighs its pairs (DPO's loss is a mean over pairs)
"""
from __future__ import annotations

import contextlib
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
from ..dist.consolidate import whole_optimizer_state, whole_trainable
from ..dist.grads import clip_gradients, reduce_gradients
from .checkpoint import read_latest_intact, restore_checkpoint, save_checkpoint
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
    metrics: list[dict] = field(default_factory=list)          # preference runs: {"step", rewards/..} per step
    eval_metrics: list[dict] = field(default_factory=list)     # preference runs: {"step", rewards/..} per eval
    tokens: int = 0          # every token the steps read (padding not counted): what tokens/s divides
    trained_tokens: int = 0  # the tokens the loss was taken over (a label, after the first position)
    seconds: float = 0.0
    interrupted: bool = False
    output_dir: Path | None = None


def make_optimizer(params, cfg: TrainConfig, log=None):
    """The run's optimiser; a paged one says in `log` when its state moves between GPU and host."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from ..optim import AdamW8bit
    return AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay, paged=cfg.optimizer.startswith("paged"),
                     log=log)


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


# ---- the objective: rows, batches and the loss -------------------------------------------------
def is_preference(cfg: TrainConfig) -> bool:
    return cfg.objective != "sft"


REFERENCE_ADAPTER = "reference"  # the name a --ref-adapter is attached under (qforge.train.run)


def preference_settings(cfg: TrainConfig):
    """The PreferenceConfig of a run: DPO's reference is the base with the adapters off, or the
    --ref-adapter attached as REFERENCE_ADAPTER."""
    from .preference import PreferenceConfig
    return PreferenceConfig(method=cfg.objective, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                            ref_adapter=REFERENCE_ADAPTER if cfg.ref_adapter else None)


def collate_rows(rows: list[dict], cfg: TrainConfig, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch as tensors: SFT rows [B, T]; B preference pairs -> 2B rows, chosen first."""
    if is_preference(cfg):
        from .preference_data import collate_pairs
        return collate_pairs(rows, pad_id)
    from .data import collate
    return collate(rows, pad_id)


def batch_units(rows, cfg: TrainConfig) -> int:
    """What a micro-batch's loss is a mean over: trained tokens (sft) or pairs (dpo, orpo)."""
    rows = list(rows)
    return len(rows) if is_preference(cfg) else label_tokens(rows)


def batch_loss(model, batch: dict, cfg: TrainConfig, settings=None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) of one collated micro-batch; metrics is empty for SFT."""
    if not is_preference(cfg):
        # use_cache=False: packed rows (position_ids, no mask) stay separate only without a KV cache
        return causal_lm_loss(model, batch), {}  # logits only where a label is
    from .preference import preference_step
    loss, metrics = preference_step(model, batch, settings or preference_settings(cfg))
    metrics.pop("loss")
    return loss, metrics


def evaluate_preference(model, dataset, cfg: TrainConfig, pad_id: int, device) -> dict[str, float]:
    """Pair-weighted means over `dataset` (preference pairs) of the loss and preference_step's
    metrics, in eval mode without gradients: {"loss", "rewards/accuracies", ...}."""
    was_training = model.training
    model.eval()
    settings, sums, pairs = preference_settings(cfg), {}, 0
    with torch.no_grad(), autocast(cfg, device):
        for start in range(0, len(dataset), cfg.batch_size):
            rows = [dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate_rows(rows, cfg, pad_id).items()}
            loss, metrics = batch_loss(model, batch, cfg, settings)
            for key, value in {"loss": float(loss), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value * len(rows)
            pairs += len(rows)
    model.train(was_training)
    return {key: value / max(pairs, 1) for key, value in sums.items()}


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


class _Run:
    """What one training run holds between its steps, and its named parts: set-up (optimiser,
    schedule, resume), one optimiser step, evaluation and the checkpoint."""

    def __init__(self, model, tokenizer, train_set, eval_set, cfg: TrainConfig, log, group: Group,
                 device: torch.device):
        self.model, self.train_set, self.eval_set, self.cfg, self.log, self.group = \
            model, train_set, eval_set, cfg, log, group
        self.device = device
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable, cfg, log)
        self.total_steps = total_steps_for(len(train_set), cfg)
        self.warmup = cfg.warmup_for(self.total_steps)
        self.save_every = cfg.checkpoint_every(self.total_steps)  # default: every 10% of the run
        self.schedule = micro_batches(len(train_set), cfg, self.total_steps)
        self.result = TrainResult(steps=self.total_steps, output_dir=self.out)
        self.preference = preference_settings(cfg) if is_preference(cfg) else None
        self.start_step = 0
        self.offload = None
        if cfg.offload_activations:
            from .offload import ActivationOffload
            self.offload = ActivationOffload(model, device)
            log(self.offload.describe())

    def resume(self) -> bool:
        """Seed, and continue from the newest checkpoint when cfg.resume; True when one was found."""
        cfg, group, result = self.cfg, self.group, self.result
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        found = read_latest_intact(self.ckpt_dir, self.log) if cfg.resume and group.is_main else (None, None)
        last = group.broadcast(found[0])
        if last is not None:
            state = restore_checkpoint(group.broadcast(found[1] if group.is_main else None),
                                       self.model, self.optimizer, group.rank)
            self.start_step = state["step"]
            result.losses, result.tokens = state["losses"], state["tokens"]
            result.trained_tokens = state.get("trained_tokens", 0)
            result.eval_losses = [tuple(e) for e in state["eval_losses"]]
            result.metrics, result.eval_metrics = state.get("metrics", []), state.get("eval_metrics", [])
            self.log(f"resumed from {last} (step {self.start_step} of {self.total_steps})")
        elif cfg.resume is True:  # asked for; "auto" (the jobs service) starts fresh quietly
            self.log(f"--resume: no checkpoint under {self.ckpt_dir}; starting from step 0")
        return last is not None

    def step(self, step: int, t0: float) -> dict:
        """Optimiser step `step` (0-based) over its micro-batches; its metrics record."""
        cfg, group, result, device = self.cfg, self.group, self.result, self.device
        lr = lr_at(step, self.total_steps, cfg.lr, self.warmup, cfg.min_lr_ratio, cfg.lr_scheduler)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        micro = self.schedule[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
        n_units = sum(batch_units((self.train_set[i] for i in idx), cfg) for idx in micro)  # the global batch's
        loss_sum, step_tokens, step_trained, metric_sums = 0.0, 0, 0, {}
        for idx in micro:
            rows, weight = group.rows(idx)
            examples = [self.train_set[i] for i in rows]
            batch = {k: v.to(device) for k, v in collate_rows(examples, cfg, self.pad_id).items()}
            share = weight * batch_units(examples, cfg) / max(n_units, 1)
            with autocast(cfg, device), self.offload or contextlib.nullcontext():
                loss, metrics = batch_loss(self.model, batch, cfg, self.preference)
            # every rank runs backward even on a bad loss: the others wait for it in FSDP's collectives
            (loss * share).backward()
            loss_sum += loss.item() * share
            for key, value in metrics.items():  # pair-weighted: the means over the global batch's pairs
                metric_sums[key] = metric_sums.get(key, 0.0) + value * share
            mask = batch.get("attention_mask")
            step_tokens += int(weight) * (int(mask.sum()) if mask is not None else batch["input_ids"].numel())
            step_trained += int(weight) * int((batch["labels"][:, 1:] != -100).sum())
        names = sorted(metric_sums)
        loss_sum, step_tokens, step_trained, *values = group.sum([loss_sum, step_tokens, step_trained,
                                                                  *(metric_sums[k] for k in names)])
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"step {step + 1}: loss is {loss_sum}; the last good checkpoint "
                                   f"under {self.ckpt_dir} is intact. {_lower_lr(cfg)} or check the data.")
        result.tokens += int(step_tokens)
        result.trained_tokens += int(step_trained)
        reduce_gradients(self.trainable, group)  # FSDP reduce-scattered the sharded ones; the whole ones here
        grad_norm = clip_gradients(self.trainable, cfg.max_grad_norm, group) if cfg.max_grad_norm else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_sum)
        metrics = dict(zip(names, values))
        if metrics:
            result.metrics.append({"step": step + 1, **metrics})
        return {"step": step + 1, "loss": loss_sum, "lr": lr, "tokens": result.tokens,
                "trained_tokens": result.trained_tokens,
                "grad_norm": None if grad_norm is None else float(grad_norm), "elapsed_s": time.perf_counter() - t0,
                **metrics}

    def evaluate_if_due(self, record: dict) -> None:
        """The eval loss every cfg.eval_every steps and at the last step, into `record`."""
        cfg, step = self.cfg, record["step"]
        if cfg.eval_every and self.eval_set is not None and (step % cfg.eval_every == 0 or step == self.total_steps):
            if is_preference(cfg):  # the same metrics as training's, as TRL's eval_ names
                metrics = evaluate_preference(self.model, self.eval_set, cfg, self.pad_id, self.device)
                record.update({f"eval_{k}": v for k, v in metrics.items()})
                self.result.eval_metrics.append({"step": step, **{k: v for k, v in metrics.items() if k != "loss"}})
            else:
                record["eval_loss"] = evaluate(self.model, self.eval_set, cfg, self.pad_id, self.device)
            self.result.eval_losses.append((step, record["eval_loss"]))

    def checkpoint(self, step: int) -> None:
        """Write checkpoint `step` (rank 0; the others wait), with every rank's generator. Sharded
        parameters and optimiser state are gathered whole first (every rank joins), so the files
        are the one-process ones whatever the number of processes."""
        result, group = self.result, self.group
        rngs = group.gather(torch.get_rng_state())
        optimizer_state = whole_optimizer_state(self.optimizer, group)
        with whole_trainable(self.model, group):
            if group.is_main:
                save_checkpoint(self.ckpt_dir, self.model, optimizer_state, step,
                                {"losses": result.losses, "tokens": result.tokens,
                                 "trained_tokens": result.trained_tokens, "eval_losses": result.eval_losses,
                                 "metrics": result.metrics, "eval_metrics": result.eval_metrics},
                                rngs)
        group.barrier()


def train_loop(model, tokenizer, train_set, eval_set, cfg: TrainConfig, log=print, on_step=None,
               group: Group | None = None, device: torch.device | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad. Writes checkpoints, metrics.jsonl and
    the loss-curve PNG under cfg.output_dir; resumes from the last checkpoint when cfg.resume.

    With a `group` of several processes (qforge.dist) each micro-batch of cfg.batch_size rows is
    split across the ranks, every rank's loss is weighted by its share of the global batch's
    tokens and the gradients are summed, so a step is the single-process step on the same global
    batch. Only rank 0 writes files and logs."""
    from tqdm.auto import tqdm

    group = group or Group()
    if not group.is_main:
        log = lambda *_: None  # noqa: E731
    device = device if device is not None else next(model.parameters()).device  # the run's, passed down
    run = _Run(model, tokenizer, train_set, eval_set, cfg, log, group, device)
    resumed = run.resume()
    result = run.result
    if group.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
    metrics = open(run.out / "metrics.jsonl" if group.is_main else os.devnull, "a" if resumed else "w")

    interrupted = {"flag": False}
    previous_handler = signal.getsignal(signal.SIGINT)
    if threading_main():
        signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not group.is_main)
    try:
        for step in range(run.start_step, run.total_steps):
            record = run.step(step, t0)
            run.evaluate_if_due(record)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            tok_s = result.tokens / max(record["elapsed_s"], 1e-9)
            bar.set_postfix(progress_fields(record, tok_s))
            bar.update(1)
            if on_step is not None:
                on_step(record)
            fault_point(group, step + 1)
            if run.save_every and (step + 1) % run.save_every == 0:
                run.checkpoint(step + 1)
            if group.any(interrupted["flag"]):
                run.checkpoint(step + 1)
                log(f"\ninterrupted: checkpoint saved at step {step + 1}{_continue_with()}")
                result.interrupted = True
                break
    finally:
        bar.close()
        metrics.close()
        if threading_main():
            signal.signal(signal.SIGINT, previous_handler)
    result.seconds = time.perf_counter() - t0
    paging = getattr(run.optimizer, "paging_report", lambda: None)()
    if paging:
        log(paging)
    if group.is_main:
        plot_losses(result, run.out / "loss.png")
    return result


def _continue_with() -> str:
    """'; continue with --resume' where the interface has the setting (a job resumes by itself)."""
    from .config import setting
    resume = setting("resume", True)
    return f"; continue with {resume}" if resume else ""


def _lower_lr(cfg: TrainConfig) -> str:
    """'Lower --lr' as the interface in use spells the learning rate."""
    from .config import setting
    return f"Lower {setting('lr') or 'the learning rate'}"


def label_tokens(rows) -> int:
    """Trained tokens of `rows` as the model's loss counts them: labels after the first, not -100."""
    return sum(int((torch.as_tensor(r["labels"][1:]) != -100).sum()) for r in rows)


def progress_fields(record: dict, tok_s: float) -> dict[str, str]:
    """The progress bar's figures: loss, reward accuracy (preference runs), learning rate, tokens/s."""
    fields = {"loss": f"{record['loss']:.4f}"}
    if "rewards/accuracies" in record:
        fields["acc"] = f"{record['rewards/accuracies']:.2f}"
    return {**fields, "lr": f"{record['lr']:.2e}", "tok_s": f"{tok_s:.0f}"}


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def plot_losses(result: TrainResult, path: Path) -> None:
    """Training loss per step (and eval loss where measured) as a PNG; preference runs get a second
    panel with reward accuracy and mean reward margin (train per step, eval where measured)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 2 if result.metrics else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(1, len(result.losses) + 1), result.losses, label="train loss", lw=1)
    if result.eval_losses:
        ax.plot(*zip(*result.eval_losses), "o-", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if result.metrics:
        _plot_rewards(axes[0][1], result)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_rewards(ax, result: TrainResult) -> None:
    """Reward accuracy (left axis) and mean margin (right axis) per step."""
    steps = [m["step"] for m in result.metrics]
    ax.plot(steps, [m["rewards/accuracies"] for m in result.metrics], label="reward accuracy", lw=1)
    if result.eval_metrics:
        ax.plot([m["step"] for m in result.eval_metrics], [m["rewards/accuracies"] for m in result.eval_metrics],
                "o-", label="eval reward accuracy")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("reward accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    margin = ax.twinx()
    margin.plot(steps, [m["rewards/margins"] for m in result.metrics], color="tab:red", lw=1, label="margin")
    if result.eval_metrics:
        margin.plot([m["step"] for m in result.eval_metrics], [m["rewards/margins"] for m in result.eval_metrics],
                    "s--", color="tab:red", label="eval margin")
    margin.set_ylabel("mean reward margin")
    lines = ax.get_legend_handles_labels()
    more = margin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right")
