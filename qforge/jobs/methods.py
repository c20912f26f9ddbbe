"""The jobs API's training methods and what each needs: the hyperparameters it takes, the settings a
job resolves to, the kind of data file it trains on, and the TrainConfig the trainer runs.

  supervised  OpenAI's SFT: demonstrations ({"messages": [...]} rows and the other SFT shapes)
  dpo         OpenAI's DPO: preference pairs ({"input": {"messages": [...]}, "preferred_output": [...],
              "non_preferred_output": [...]}, or TRL's / ShareGPT's pair shapes); beta, label_smoothing
  orpo        qforge's own, in OpenAI's shape ({"type": "orpo", "orpo": {"hyperparameters": ...}}):
              the same pairs, reference-free; beta is ORPO's lambda

An upload is read as preference pairs when its first row has a pair's keys (preferred_output,
non_preferred_output, chosen, rejected), else as SFT data; the stored file's format says which
("preference-<shape>" for pairs), so a job whose method wants the other kind is a 400 at creation.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..serve.api import APIError
from .schemas import DpoHyperparameters, Hyperparameters, MethodBody, OrpoHyperparameters, QForgeHyperparameters

OBJECTIVES = {"supervised": "sft", "dpo": "dpo", "orpo": "orpo"}  # method type -> TrainConfig.objective
HYPERPARAMETERS = {"supervised": QForgeHyperparameters, "dpo": DpoHyperparameters, "orpo": OrpoHyperparameters}
PREFERENCE_KEYS = frozenset({"preferred_output", "non_preferred_output", "chosen", "rejected"})
PREFERENCE_FMT = "preference-"  # a stored file's format prefix: preference-openai, -trl, -sharegpt
PAIR_SHAPE = ('{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}], '
              '"non_preferred_output": [{"role": "assistant", ...}]}')


# ---- the request's method -----------------------------------------------------------------------
def check_method(method: MethodBody) -> str:
    """The method's type, after refusing what it cannot take: a type qforge does not train, settings
    under another type's key, and hyperparameters it does not know (the 400 lists the accepted ones)."""
    kind = method.type
    if kind not in OBJECTIVES:
        raise APIError(400, f"method '{kind}' is not supported; use one of {', '.join(map(repr, OBJECTIVES))}",
                       param="method.type", code="unsupported")
    for other in OBJECTIVES:
        if other != kind and getattr(method, other) is not None:
            raise APIError(400, f"method.{other} is given but method.type is '{kind}': the settings go under "
                           f"method.{kind}", param=f"method.{other}")
    hp = method.settings()
    if hp is not None and hp.model_extra:
        unknown = sorted(hp.model_extra)
        accepted = ", ".join(HYPERPARAMETERS[kind].model_fields)
        raise APIError(400, f"unknown hyperparameter{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                       f"for method '{kind}'; accepted: {accepted}",
                       param=f"method.{kind}.hyperparameters.{unknown[0]}", code="unknown_parameter")
    return kind


def check_top_level(top: Hyperparameters | None, kind: str) -> None:
    """400 for a top-level hyperparameter method `kind` does not take (the message lists the accepted
    ones; the same names as under method.<kind>.hyperparameters)."""
    if top is None:
        return
    accepted = HYPERPARAMETERS[kind].model_fields
    unknown = sorted(set(top.model_extra or {}) | {k for k in top.model_fields_set if k not in accepted})
    if unknown:
        raise APIError(400, f"unknown hyperparameter{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                       f"for method '{kind}'; accepted: {', '.join(accepted)}",
                       param=f"hyperparameters.{unknown[0]}", code="unknown_parameter")


def resolve_settings(top: Hyperparameters | None, given_hp: QForgeHyperparameters | None,
                     kind: str = "supervised", max_processes: int = 1) -> dict:
    """Every training setting of a job: the request's (the method's over the top-level ones, which
    take the same names), then defaults; a preference method's beta (and DPO's label_smoothing) too.
    APIError 400 for a top-level key the method does not take, and for n_processes over
    `max_processes` or with a method that trains in one process (check_processes)."""
    check_top_level(top, kind)
    given = {}
    for part in (top, given_hp):
        if part is not None:
            given |= {k: v for k, v in part.model_dump(exclude_none=True).items() if k not in (part.model_extra or {})}
    from ..train.config import TrainConfig

    base = TrainConfig()  # the one home of the defaults
    auto = {"n_epochs": base.epochs, "batch_size": base.batch_size, "learning_rate_multiplier": 1.0, "method": "auto"}
    if kind in ("dpo", "orpo"):
        auto["beta"] = base.beta
    settings = {k: (auto[k] if given.get(k, "auto") == "auto" else given[k]) for k in auto}
    defaults = {k: getattr(base, k) for k in ("rank", "dropout", "target_modules", "quant_type", "double_quant",
                                              "max_seq_len", "max_steps", "grad_accum", "compute_dtype")}
    defaults |= {"alpha": None, "save_every": None,  # the service's own: alpha 2 x rank, ~10 checkpoints a job
                 "n_processes": 1}
    if kind == "dpo":
        defaults["label_smoothing"] = base.label_smoothing
    settings |= {k: given.get(k, v) for k, v in defaults.items()}
    if settings["alpha"] is None:
        settings["alpha"] = 2.0 * settings["rank"]
    check_processes(settings, kind, max_processes, in_method=given_hp is not None and given_hp.n_processes is not None)
    return settings


def check_processes(settings: dict, kind: str, limit: int, in_method: bool) -> None:
    """400 naming hyperparameters' n_processes when a job asks for more processes than the service runs
    a job in (`limit`, its --max-processes-per-job), or for several with a method that trains in one
    (BF16 LoRA, a full fine-tune: only QLoRA's 4-bit base is sharded across processes). `in_method`:
    the value came from method.<kind>.hyperparameters (else from the top level)."""
    n = settings.get("n_processes", 1)
    param = f"method.{kind}.hyperparameters.n_processes" if in_method else "hyperparameters.n_processes"
    if n > limit:
        raise APIError(400, f"{param}: expected an integer from 1 to {limit} (this service's "
                       f"--max-processes-per-job), got {n}", param=param, code="invalid_value")
    if n > 1 and settings["method"] not in ("qlora", "auto"):
        raise APIError(400, f"{param}: method '{settings['method']}' trains in one process; several processes "
                       f"(here {n}) shard QLoRA's 4-bit base: use method 'qlora' or n_processes 1",
                       param=param, code="unsupported")
    if n > 1 and kind in ("dpo", "orpo"):
        raise APIError(400, f"{param}: {kind} jobs train in one process for now (the preference loss runs the "
                       f"sharded output layer a different number of times on each rank); got {n}",
                       param=param, code="unsupported")


def choose_method(base_model: str, settings: dict, budget: int, kind: str = "supervised") -> tuple[str, str]:
    """(qlora, reason): QLoRA, `qforge train`'s default, with the memory planner's verdict on whether it
    fits `budget` (bytes); BF16 LoRA only when asked for by name. A preference step runs the chosen and
    the rejected reply of each pair, so it is planned as twice the batch."""
    from ..plan import format_gb, load_arch, plan_run

    rows = settings["batch_size"] * (2 if kind in ("dpo", "orpo") else 1)
    try:
        plan = plan_run(load_arch(base_model), "qlora", seq_len=settings["max_seq_len"], batch_size=rows,
                        rank=settings["rank"], quant_type=settings["quant_type"],
                        double_quant=settings["double_quant"], chunked_loss=True, residual_bytes=4)  # as qforge train runs
    except (ValueError, FileNotFoundError, OSError) as exc:
        return "qlora", f"qforge train's default; the memory planner cannot read '{base_model}' ({exc})"
    run = f"batch {rows} x {settings['max_seq_len']} tokens, rank {settings['rank']}"
    need, room = format_gb(plan.per_gpu_total), format_gb(budget)
    if plan.per_gpu_total <= budget:
        return "qlora", f"qforge train's default; the plan ({run}) needs {need} of the {room} memory budget"
    return "qlora", (f"qforge train's default, the smallest method; the plan ({run}) needs {need}, over the {room} "
                     "memory budget: lower max_seq_len or batch_size if the run runs out of memory")


def method_settings(job: dict) -> tuple[str, dict]:
    """(type, its resolved hyperparameters) of a stored job."""
    kind = job["method"]["type"]
    return kind, job["method"][kind]["hyperparameters"]


def train_config(job: dict, settings: dict, base_model: str, job_dir: Path):
    """The TrainConfig a job trains with (its objective from the method's type)."""
    from ..train.config import TrainConfig

    keys = ("method", "rank", "alpha", "dropout", "target_modules", "quant_type", "double_quant", "max_seq_len",
            "max_steps", "save_every", "grad_accum", "compute_dtype", "batch_size")
    preference = {k: settings[k] for k in ("beta", "label_smoothing") if k in settings}
    has_eval = job["validation_file"] is not None
    return TrainConfig(model=base_model, data=str(job_dir / "train.jsonl"),
                       eval_data=str(job_dir / "valid.jsonl") if has_eval else None,
                       lr=TrainConfig().lr * settings["learning_rate_multiplier"], epochs=settings["n_epochs"],
                       eval_every=settings["save_every"] if has_eval else 0, seed=job["seed"],
                       output_dir=str(job_dir / "run"), resume="auto", objective=OBJECTIVES[job["method"]["type"]],
                       **preference, **{k: settings[k] for k in keys})


def describe(kind: str, settings: dict) -> str | None:
    """A preference job's objective for its events (None for supervised)."""
    if kind == "dpo":
        smoothing = f", label smoothing {settings['label_smoothing']:g}" if settings.get("label_smoothing") else ""
        return (f"Preference tuning: DPO, beta {settings['beta']:g}{smoothing}; the reference is the base model "
                "with the adapter switched off")
    if kind == "orpo":
        return f"Preference tuning: ORPO, lambda (beta) {settings['beta']:g}; reference-free"
    return None


# ---- data files ---------------------------------------------------------------------------------
def looks_like_pairs(path: Path) -> bool:
    """Whether an uploaded JSONL file's first row has a preference pair's keys."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False  # the SFT reader names the bad line
                return isinstance(row, dict) and not PREFERENCE_KEYS.isdisjoint(row)
    return False


def read_upload(path: Path) -> tuple[int, str]:
    """(rows, format) of an uploaded file: preference pairs or SFT data, checked row by row.
    Raises qforge.train.data.DataError naming the path and line of the first bad row."""
    from .checks import check_jsonl_lines
    check_jsonl_lines(path)  # what json.loads accepts but a row must not hold, before any reader sees it
    if looks_like_pairs(path):
        from ..train.preference_data import load_preference_rows
        rows, shape = load_preference_rows(path)
        return len(rows), PREFERENCE_FMT + shape
    from ..train.data import load_rows
    rows, fmt = load_rows(path)
    return len(rows), fmt


def check_file_for(kind: str, param: str, row: dict, path: Path) -> None:
    """400 when file `row` (stored at `path`) is not the data method `kind` trains on: preference pairs
    for dpo and orpo (read again here: the error names the uploaded file's name and line), and
    demonstrations for supervised."""
    fmt = row.get("format") or ""
    pairs = fmt.startswith(PREFERENCE_FMT)
    if kind == "supervised":
        if pairs:
            raise APIError(400, f"invalid {param}: '{row['filename']}' ({row['id']}) holds preference pairs "
                           f"({fmt.removeprefix(PREFERENCE_FMT)} shape), which a supervised job cannot train on: use "
                           "method 'dpo' (or 'orpo'), or upload demonstrations ({\"messages\": [...]} per line)",
                           param=param, code=f"invalid_{param}")
        return
    from ..train.data import DataError
    from ..train.preference_data import load_preference_rows
    try:
        load_preference_rows(path)
    except DataError as exc:
        hint = "" if pairs else f" (a {kind} job trains on preference pairs, one per line: {PAIR_SHAPE})"
        raise APIError(400, f"invalid {param} for method '{kind}': {str(exc).replace(str(path), row['filename'])}"
                       f"{hint}", param=param, code=f"invalid_{param}") from None
