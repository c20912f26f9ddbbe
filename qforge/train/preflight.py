"""Checks that run before the model is loaded, so a bad path, a bad row or a bad setting fails in
seconds rather than after minutes of loading: the data (every row read and validated: SFT rows, or
preference pairs for objective dpo/orpo), the adapters to continue or to use as the reference, the
output directory, the chat template, the trackers and the model source."""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

from .config import TrainConfig


def check_output_dir(path: str | Path) -> None:
    """The output directory is a folder that exists or can be made, and a file can be written there.
    Nothing is created: a run that fails a later check leaves no empty folder behind (the folder is
    made once the model has loaded)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir '{out}' is a file; expected a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output_dir '{out}': '{existing}' is a file, so the folder cannot be made")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".qforge-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"output_dir '{out}' is not writable: {exc.strerror or exc}") from None


def check_existing_adapter(cfg: TrainConfig, overwrite: bool = False) -> None:
    """An adapter (or the checkpoints of an interrupted run) a previous run left in output_dir is
    kept: a ValueError naming the flags that replace it (overwrite) or continue it (resume), unless
    one of them is given."""
    from .config import setting
    out = Path(cfg.output_dir).expanduser()
    if overwrite or cfg.resume:
        return
    if (out / "adapter" / "adapter_config.json").exists():
        held = f"an adapter ({out / 'adapter'})"
    elif any((out / "checkpoints").glob("step-*")):
        held = f"the checkpoints of an earlier run ({out / 'checkpoints'})"
    else:
        return
    raise ValueError(f"output_dir '{cfg.output_dir}' already holds {held}; give {setting('overwrite', True)} to "
                     f"replace it, {setting('resume', True)} to continue that run, or another {setting('output_dir')}")


def clear_earlier_run(output_dir: str | Path) -> None:
    """With --overwrite: the earlier run's checkpoints go (once this run has passed its checks and
    loaded), so that a later --resume cannot continue from a step of the run that was replaced."""
    import shutil
    shutil.rmtree(Path(output_dir).expanduser() / "checkpoints", ignore_errors=True)


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


def read_preference_splits(cfg: TrainConfig) -> tuple[list[dict], list[dict], str, int]:
    """read_splits for preference pairs (qforge.train.preference_data): (train, eval, shape, pairs read).
    The eval pairs come from cfg.eval_data, the eval split of a saved DatasetDict, or cfg.eval_fraction
    of the training pairs by a seeded shuffle; a bad row is a DataError naming its file and line."""
    from .data import split_rows
    from .datafiles import eval_split_name
    from .preference_data import load_preference_rows

    if cfg.eval_data is not None and cfg.eval_fraction > 0:
        raise ValueError("give eval_data or eval_fraction, not both")
    rows, shape = load_preference_rows(cfg.data)
    rows = rows[:cfg.max_samples] if cfg.max_samples is not None else rows
    split = eval_split_name(cfg.data) if cfg.eval_data is None and cfg.eval_fraction == 0 else None
    if cfg.eval_data is not None:
        eval_rows = load_preference_rows(cfg.eval_data)[0]
    elif split is not None:
        eval_rows = load_preference_rows(cfg.data, split=split)[0]
    else:
        rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    return rows, eval_rows, shape, len(rows) + len(eval_rows)


# adapter_config.json's keys -> TrainConfig's: a continued adapter keeps its own shape
ADAPTER_SETTINGS = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
                    "use_rslora": "use_rslora", "use_dora": "use_dora"}


def adapter_settings(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """Check --adapter and --ref-adapter folders (PEFT LoRA adapters) before loading; with --adapter,
    its rank, alpha, dropout, targets, rsLoRA and DoRA win over cfg's (the adapter continues as it
    was made). Returns (cfg, a line saying what changed, or "")."""
    from ..adapters.peft_format import read_adapter_config

    if cfg.ref_adapter is not None:
        read_adapter_config(cfg.ref_adapter, experts=True)
    if cfg.adapter is None:
        return cfg, ""
    if cfg.loftq_iters > 0:
        raise ValueError("adapter: continuing an adapter and LoftQ (loftq_iters > 0) both set the adapter's "
                         "starting weights; give one")
    config = read_adapter_config(cfg.adapter, experts=True)
    found = {ours: config[theirs] for theirs, ours in ADAPTER_SETTINGS.items() if config.get(theirs) is not None}
    found["target_modules"] = _adapter_targets(config.get("target_modules"))
    changes = {k: v for k, v in found.items() if getattr(cfg, k) != v}
    if not changes:
        return cfg, f"adapter: continuing {cfg.adapter}"
    said = ", ".join(f"{k} {getattr(cfg, k)!r} -> {v!r}" for k, v in changes.items())
    return dataclasses.replace(cfg, **changes), f"adapter: continuing {cfg.adapter}; its adapter_config.json wins: {said}"


def _adapter_targets(targets) -> str | list[str]:
    """cfg.target_modules for an adapter's target_modules: its leaf names (["q_proj", "v_proj"]) as
    they are; full module paths (what PEFT writes for "all-linear") or a pattern: "all-linear", so
    that every linear is an adapter layer and the file's weights say which carry an adapter."""
    if isinstance(targets, list) and targets and all(isinstance(t, str) and "." not in t for t in targets):
        return sorted(targets)
    return "all-linear"


def check_before_loading(cfg: TrainConfig, check_dir: bool = True, log=print):
    """Run every check that needs no model; returns (cfg with per-epoch settings resolved and a
    continued adapter's shape, the data as qforge.train.data.read_splits returns it (preference
    pairs for dpo/orpo), a Hub id's local folder or None)."""
    from .data import read_splits
    from ..model.templates import check_template, read_template
    from .tracking import check_trackers

    if not cfg.data:
        raise ValueError("no training data: give --data FILE (or `data:` in the recipe)")
    if cfg.objective == "sft":
        splits = read_splits(cfg.data, cfg.data_format, cfg.eval_data, cfg.eval_fraction, cfg.seed, cfg.max_samples,
                             cfg.field_map)
    else:
        splits = read_preference_splits(cfg)
    cfg, note = adapter_settings(cfg)
    if note:
        log(note)
    if check_dir:
        check_output_dir(cfg.output_dir)
    if cfg.chat_template:
        check_template(read_template(cfg.chat_template), repr(cfg.chat_template))
    check_trackers(cfg.report_targets())
    hub_folder = check_model_source(cfg)
    return per_epoch_settings(cfg, len(splits[0])), splits, hub_folder
