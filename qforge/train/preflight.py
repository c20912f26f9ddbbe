"""Checks that run before the model is loaded, so a bad path, a bad row or a bad setting fails in
seconds rather than after minutes of loading: the data (every row read and validated), the
output directory, the chat template, the trackers and the model source."""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

from .config import TrainConfig


def check_output_dir(path: str | Path) -> None:
    """The output directory exists or can be made, and a file can be written in it."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir '{out}' is a file; expected a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".qforge-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"output_dir '{out}' is not writable: {exc.strerror or exc}") from None


def check_model_source(cfg: TrainConfig) -> Path | None:
    """'smollm2', an existing file or folder, or a Hub id that resolves (cache or download); returns
    a Hub id's local folder (for the memory plan), else None."""
    from ..model.hub import looks_like_hub_id, resolve_model_id
    source = cfg.model
    if source.lower() == "smollm2":
        return None
    if looks_like_hub_id(source):
        return resolve_model_id(source, cfg.revision)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model '{source}' not found: not a folder, a .gguf file or a Hugging Face Hub "
                                "id (ORG/NAME)")
    return None


def per_epoch_settings(cfg: TrainConfig, train_rows: int) -> TrainConfig:
    """evals_per_epoch / saves_per_epoch (Axolotl's) as eval_every / save_every, now that the number
    of steps in an epoch is known."""
    steps = max(1, math.ceil(math.ceil(train_rows / cfg.batch_size) / cfg.grad_accum))
    changes = {}
    if cfg.evals_per_epoch and not cfg.eval_every:
        changes["eval_every"] = max(1, steps // int(cfg.evals_per_epoch))
    if cfg.saves_per_epoch and not cfg.save_every:
        changes["save_every"] = max(1, steps // int(cfg.saves_per_epoch))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def check_before_loading(cfg: TrainConfig, check_dir: bool = True):
    """Run every check that needs no model; returns (cfg with per-epoch settings resolved, the
    data as qforge.train.data.read_splits returns it, a Hub id's local folder or None)."""
    from .data import read_splits
    from ..model.templates import check_template, read_template
    from .tracking import check_trackers

    if not cfg.data:
        raise ValueError("no training data: give --data FILE (or `data:` in the recipe)")
    splits = read_splits(cfg.data, cfg.data_format, cfg.eval_data, cfg.eval_fraction, cfg.seed, cfg.max_samples)
    if check_dir:
        check_output_dir(cfg.output_dir)
    if cfg.chat_template:
        check_template(read_template(cfg.chat_template), repr(cfg.chat_template))
    check_trackers(cfg.report_targets())
    hub_folder = check_model_source(cfg)
    return per_epoch_settings(cfg, len(splits[0])), splits, hub_folder
