"""Experiment tracking beside metrics.jsonl and loss.png: TensorBoard event files and Weights & Biases.

`--report-to tensorboard,wandb` (default none). Each optimiser step's record (the one the loop
writes to metrics.jsonl) becomes scalars: train/loss, train/learning_rate, train/tokens_per_second
(of that step), train/memory_mib (the process' peak: accelerator memory on a GPU, resident memory
on the CPU) and eval/loss where measured; preference runs add train/rewards/chosen, .../rejected,
.../accuracies, .../margins, train/logps/* (ORPO: train/nll_loss, train/log_odds_*) and the same under
eval/ where measured; the recipe is the run's config (TensorBoard: a text
summary `recipe` holding its YAML; W&B: the run config).

TensorBoard events go to OUTPUT_DIR/tensorboard. W&B runs through its own client, online when
the user is logged in (WANDB_API_KEY or a netrc entry), offline otherwise (WANDB_MODE wins), with
its files under OUTPUT_DIR/wandb.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path


class TrackingError(ValueError):
    """A tracker asked for that cannot run here (its package missing)."""


def check_trackers(targets: list[str]) -> None:
    """Fail before any model loads when a tracker's package is missing."""
    for target in targets:
        if target == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise TrackingError("--report-to tensorboard needs the tensorboard package "
                                    "(pip install tensorboard)") from None
        elif target == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise TrackingError("--report-to wandb needs the wandb package (pip install wandb)") from None


def memory_mib() -> float:
    """Peak memory of this process in MiB: the accelerator's when one is in use, else resident memory."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


PREFERENCE_METRICS = ("rewards/", "logps/", "nll_loss", "log_odds_")  # qforge.train.preference's metric names


class Trackers:
    """The trackers of one run; `log(record)` per step, `close()` at the end. Rank 0 only."""

    def __init__(self, cfg, out_dir: Path, targets: list[str] | None = None):
        self.targets = cfg.report_targets() if targets is None else targets
        check_trackers(self.targets)
        self.tb = self.wandb_run = None
        self._last = None  # (tokens, elapsed_s) of the previous record
        recipe = dataclasses.asdict(cfg)
        if "tensorboard" in self.targets:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            self.tb.add_text("recipe", "```\n" + cfg.to_yaml() + "```", 0)
        if "wandb" in self.targets:
            import wandb
            (Path(out_dir) / "wandb").mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=cfg.wandb_project or "qforge", entity=cfg.wandb_entity,
                                        name=cfg.wandb_name, dir=str(out_dir), config=recipe,
                                        mode=cfg.wandb_mode or wandb_mode())

    def scalars(self, record: dict) -> dict[str, float]:
        """The scalars logged for one step's record."""
        tokens, elapsed = record.get("tokens", 0), record.get("elapsed_s", 0.0)
        values = {"train/loss": record["loss"], "train/learning_rate": record["lr"], "train/memory_mib": memory_mib()}
        # the first step after a resume has no previous record here: its rate would mix the runs
        last = self._last or ((0, 0.0) if record["step"] == 1 else None)
        if last is not None and elapsed > last[1]:
            values["train/tokens_per_second"] = (tokens - last[0]) / (elapsed - last[1])
        if record.get("grad_norm") is not None:
            values["train/grad_norm"] = record["grad_norm"]
        if record.get("eval_loss") is not None:
            values["eval/loss"] = record["eval_loss"]
        for key, value in record.items():  # preference runs: rewards/*, logps/*, ORPO's terms (TRL's names)
            name = key[len("eval_"):] if key.startswith("eval_") else key
            if value is not None and name.startswith(PREFERENCE_METRICS):
                values[("eval/" if name != key else "train/") + name] = value
        self._last = (tokens, elapsed)
        return values

    def log(self, record: dict) -> None:
        if not self.targets:
            return
        values, step = self.scalars(record), record["step"]
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
