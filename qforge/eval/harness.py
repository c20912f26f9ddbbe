"""lm-evaluation-harness (`lm-eval`) against an OpenAI-compatible server, one model at a time.

lm-eval's `local-completions` backend asks `/v1/completions` for the log-probs of each choice after
its context (`echo: true`, `logprobs: 1`, `max_tokens: 1`, token ids as the prompt) and for greedy
generations up to a stop string; `qforge serve` answers both, so any lm-eval task runs against the
base model or any adapter it serves, several adapters on one server.

Three small tasks ship with qforge (qforge/data/lm_eval/): `qforge_mc`, a log-likelihood multiple
choice (12 questions; acc, acc_norm), `qforge_gen`, a generate-until task (8 questions; exact_match),
and `qforge_extract`, the demo fine-tuning task's 100 held-out rows as a generate-until task in
ChatML (exact_match of the extracted JSON). Their YAML names their JSONL; `prepare_tasks` copies
them into a work folder with the data paths made absolute (lm-eval reads `data_files` relative to
the working directory) -- nothing is downloaded.
Any other lm-eval task (its own YAML folder given as an include path, or a registered task whose data
is already in the Hugging Face cache) runs the same way.

This module talks HTTP only (lm-eval does); the server is the caller's (commands/eval.py).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
BUILTIN_TASKS = ("qforge_mc", "qforge_gen", "qforge_extract")
STDERR_TAG = "_stderr"


def prepare_tasks(work: Path) -> Path:
    """Write the shipped task YAMLs into work/tasks with absolute data paths; the include path."""
    out = Path(work) / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for source in sorted(TASKS_DIR.glob("*.yaml")):
        spec = yaml.safe_load(source.read_text())
        files = spec.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((TASKS_DIR / name).resolve())
        (out / source.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def server_model_args(base_url: str, model: str, tokenizer: str, max_length: int = 2048,
                      num_concurrent: int = 8) -> dict:
    """lm-eval's `local-completions` arguments for model `model` of the server at `base_url` (…/v1).
    `num_concurrent` requests in flight at once: the server batches them (continuous batching)."""
    return {"base_url": base_url.rstrip("/") + "/completions", "model": model, "tokenizer": tokenizer,
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": num_concurrent,
            "max_retries": 1, "max_length": max_length, "timeout": 600}


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (it reads every task YAML it ships: seconds), once per include path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], include_path: Path | None = None) -> None:
    """ValueError naming the tasks lm-eval does not know (before any model is loaded)."""
    manager = _task_manager(str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; qforge ships {list(BUILTIN_TASKS)} "
                         "(give other task folders with --include-path)")


def evaluate(backend: str, model_args: dict, tasks: list[str], include_path: Path | None = None,
             limit: int | None = None, batch_size: int = 1) -> dict[str, dict[str, float]]:
    """Run lm-eval's `simple_evaluate` and return {task: {metric: value}} (stderr values dropped)."""
    import lm_eval

    check_tasks(tasks, include_path)
    manager = _task_manager(str(include_path) if include_path is not None else None)
    out = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=list(tasks), task_manager=manager,
                                  limit=limit, batch_size=batch_size, bootstrap_iters=0, log_samples=False)
    return {task: _metrics(values) for task, values in out["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's "acc,none" keys as "acc" ("acc,filter" as "acc/filter"), numbers only."""
    metrics = {}
    for key, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or "," not in key:
            continue
        name, _, filt = key.partition(",")
        if STDERR_TAG in name:
            continue
        metrics[name if filt == "none" else f"{name}/{filt}"] = float(value)
    return metrics


# ---- the report ----------------------------------------------------------------------------------
def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per model, one column per task/metric, values in percent."""
    columns = sorted({(t, m) for by_task in results.values() for t, ms in by_task.items() for m in ms})
    head = "| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [head, rule]
    for model, by_task in results.items():
        cells = [_percent(by_task.get(t, {}).get(m)) for t, m in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def bar_chart(results: dict[str, dict[str, dict[str, float]]], path: Path) -> Path:
    """Grouped bars: one group per task/metric, one bar per model, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({(t, m) for by_task in results.values() for t, ms in by_task.items() for m in ms})
    models = list(results)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(columns) + 2), 3.6))
    for i, model in enumerate(models):
        values = [100 * results[model].get(t, {}).get(m, float("nan")) for t, m in columns]
        ax.bar([c + (i - (len(models) - 1) / 2) * width for c in range(len(columns))], values, width, label=model)
    ax.set_xticks(range(len(columns)), [f"{t}\n{m}" for t, m in columns])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("lm-eval through qforge serve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, dict[str, dict[str, float]]], out_dir: Path, meta: dict | None = None
                 ) -> dict[str, Path]:
    """eval.md, eval.json and eval.png under out_dir (written whole: temp name, then rename)."""
    from ..fileio import atomic_write_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "eval.md"
    atomic_write_bytes(md, ("# lm-eval results (percent)\n\n" + markdown_table(results)).encode())
    js = out_dir / "eval.json"
    atomic_write_bytes(js, (json.dumps({"results": results, **(meta or {})}, indent=2) + "\n").encode())
    png = bar_chart(results, out_dir / "eval.png")
    return {"markdown": md, "json": js, "chart": png}
