"""Evaluate the base model and adapters with lm-evaluation-harness through one qforge server.

  qforge eval --tasks qforge_mc,qforge_gen --models base,a,b --adapter a=runs/a/adapter --adapter b=runs/b/adapter
  qforge eval --url http://127.0.0.1:8000/v1 --tokenizer runs/merged --models smollm2,ft:smollm2::ftjob-1 --tasks ...

Without --url, servers are started in this process on free loopback ports, ONE PER BASE, and stopped
at the end: each adapter is served on the base it was trained on (its qforge_base.json, else the run's
config.yaml beside it (method lora: dense; quant_type), else NF4; --adapter-base NAME=nf4|none|...
overrides), "base" on the --base-quant base, and each --full NAME=DIR (a full fine-tune or a merged
model) densely on its own server. Every model is evaluated by lm-eval's `local-completions` backend (log-likelihood tasks via `echo` + `logprobs`, generation
tasks via greedy completions). "base" in --models names the served base model. qforge ships three
small offline tasks: qforge_mc (multiple choice, acc), qforge_gen (generate-until, exact_match) and
qforge_extract (the demo task's held-out rows in ChatML, exact_match; see qforge/eval/harness.py);
other lm-eval task folders come in with --include-path. Writes eval.md (one table, percent),
eval.json and eval.png (bars per task and model) under --output-dir.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TASKS = "qforge_mc,qforge_gen"
SERVE_QUANTS = ("nf4", "fp4", "hqq4", "hqq3", "hqq2", "none")  # qforge.model.serving.SERVE_QUANT_TYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"comma-separated lm-eval tasks (default {DEFAULT_TASKS})")
    parser.add_argument("--models", default="base",
                        help="comma-separated served model names; 'base' is the base model (default: base)")
    parser.add_argument("--base", default="smollm2",
                        help="base model to serve: 'smollm2' (default), a model folder or a .gguf file")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve this PEFT adapter as model NAME (repeatable; default: none)")
    parser.add_argument("--adapter-base", action="append", default=[], metavar="NAME=QUANT",
                        help="the base adapter NAME was trained on, one of nf4|fp4|hqq4|hqq3|hqq2|none (none: dense); "
                             "overrides what its folder records (repeatable; default: its qforge_base.json, else "
                             "its run's config.yaml, else nf4)")
    parser.add_argument("--full", action="append", default=[], metavar="NAME=DIR",
                        help="a fully fine-tuned or merged model folder, served densely on its own server as model "
                             "NAME (repeatable; default: none)")
    parser.add_argument("--base-quant", choices=SERVE_QUANTS, default="nf4",
                        help="how 'base' in --models is served: nf4 (default) ... or none (dense)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="float32",
                        help="compute dtype of the started servers (default float32)")
    parser.add_argument("--url", default=None,
                        help="use a running server at this /v1 URL instead of starting one (default: start one)")
    parser.add_argument("--api-key", default=None, help="bearer key for --url (default: none)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for lm-eval (default: the started server's, saved to --output-dir; "
                             "required with --url)")
    parser.add_argument("--include-path", default=None, help="extra lm-eval task folder (default: none)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--output-dir", default="runs/eval", help="where eval.md/json/png go (default runs/eval)")


@dataclass
class EvalOptions:
    """What one evaluation runs on: the server it starts (base, adapters as (name, folder), dtype) or
    the one at `url`, and where the report goes. `qforge eval` maps its flags to one; `qforge bench
    --eval-tasks` builds one directly (evaluate_adapters)."""
    base: str = "smollm2"
    adapters: list[tuple[str, Path]] = field(default_factory=list)
    adapter_bases: dict[str, str] = field(default_factory=dict)  # name -> quant type, over the folder's record
    full: list[tuple[str, Path]] = field(default_factory=list)   # (name, model folder): served densely
    base_quant: str = "nf4"
    dtype: str = "float32"
    url: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None
    include_path: str | None = None
    limit: int | None = None
    output_dir: str = "runs/eval"


def run(args: argparse.Namespace) -> int:
    from .serve import parse_adapters

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not tasks or not models:
        raise ValueError("--tasks and --models must each name at least one")
    bases = dict(_pairs(args.adapter_base, "--adapter-base"))
    bad = {n: q for n, q in bases.items() if q not in SERVE_QUANTS}
    if bad:
        raise ValueError(f"--adapter-base {bad}: expected NAME=one of {', '.join(SERVE_QUANTS)}")
    adapters = parse_adapters(args.adapter)
    unknown = sorted(set(bases) - {name for name, _ in adapters})
    if unknown:
        raise ValueError(f"--adapter-base names {unknown}, which no --adapter gives")
    options = EvalOptions(base=args.base, adapters=adapters, adapter_bases=bases,
                          full=[(n, Path(d)) for n, d in _pairs(args.full, "--full")], base_quant=args.base_quant,
                          dtype=args.dtype, url=args.url, api_key=args.api_key, tokenizer=args.tokenizer,
                          include_path=args.include_path, limit=args.limit, output_dir=args.output_dir)
    evaluate_models(options, models, tasks)
    return 0


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        out.append((name, value))
    return out


def evaluate_adapters(base: str, adapters: dict[str, str], tasks: list[str], output_dir: str | Path,
                      limit: int | None = None, dtype: str = "float32", full: dict[str, str] | None = None,
                      adapter_bases: dict[str, str] | None = None) -> dict:
    """The base, each adapter (name -> PEFT folder) on the base it was trained on and each full
    fine-tune (name -> model folder) served densely: one server per base. What `qforge bench
    --eval-tasks` calls. Returns {model: {task: {metric: value}}} and writes the one report."""
    options = EvalOptions(base=base, adapters=[(name, Path(folder)) for name, folder in adapters.items()],
                          adapter_bases=dict(adapter_bases or {}),
                          full=[(name, Path(folder)) for name, folder in (full or {}).items()],
                          dtype=dtype, limit=limit, output_dir=str(output_dir))
    return evaluate_models(options, ["base", *adapters, *(full or {})], tasks)


def adapter_base(folder: Path, override: str | None = None) -> str:
    """The base quantisation an adapter was trained on ("none": dense): `override`, else its
    qforge_base.json, else its run's config.yaml (method lora or full: dense; else quant_type), else nf4."""
    from ..adapters.base_record import read_base_record

    if override:
        return override
    record = read_base_record(Path(folder))
    if record is not None:
        return str(record["quant_type"])
    try:
        import yaml
        run = yaml.safe_load((Path(folder).parent / "config.yaml").read_text()) or {}
    except (OSError, ValueError, AttributeError):
        run = {}
    if isinstance(run, dict) and run.get("method") in ("lora", "full"):
        return "none"
    quant = run.get("quant_type") if isinstance(run, dict) else None
    return str(quant) if quant in SERVE_QUANTS else "nf4"


@dataclass
class ServerPlan:
    """One server of an evaluation: its base (folder or name), how it is served, the adapters on it
    and the models (shown name -> served name; None: the server's base model) evaluated on it."""
    base: str
    quant_type: str
    adapters: list[tuple[str, Path]] = field(default_factory=list)
    models: dict[str, str | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.base} ({'dense' if self.quant_type == 'none' else self.quant_type})"


def server_plans(options: EvalOptions, models: list[str]) -> list[ServerPlan]:
    """The servers `models` need, one per (base, quantisation), in the order models first need them."""
    adapters, full = dict(options.adapters), dict(options.full)
    plans: dict[tuple[str, str], ServerPlan] = {}

    def plan(base: str, quant: str) -> ServerPlan:
        return plans.setdefault((base, quant), ServerPlan(base, quant))

    for m in models:
        if m == "base":
            plan(options.base, options.base_quant).models[m] = None
        elif m in adapters:
            p = plan(options.base, adapter_base(adapters[m], options.adapter_bases.get(m)))
            p.adapters.append((m, adapters[m]))
            p.models[m] = m
        elif m in full:
            plan(str(full[m]), "none").models[m] = None
        else:
            raise ValueError(f"--models names '{m}', which no server serves (give it with --adapter or --full)")
    return list(plans.values())


def evaluate_models(options: EvalOptions, models: list[str], tasks: list[str]) -> dict:
    from ..eval import harness

    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    include = harness.prepare_tasks(out / "work")
    if options.include_path:
        include = _merge_include(include, Path(options.include_path))
    harness.check_tasks(tasks, include)
    if options.url:
        if not options.tokenizer:
            raise ValueError("--url needs --tokenizer (a folder with the served model's tokenizer files)")
        results = _evaluate_all(options.url, options.tokenizer, models, models, tasks, include, options)
    else:
        results = _with_own_server(options, models, tasks, include, out)
    served_on = {} if options.url else {m: p.label for p in server_plans(options, models) for m in p.models}
    paths = harness.write_report(results, out, {"tasks": tasks, "models": list(results), "served_on": served_on})
    for m, label in served_on.items():
        print(f"  {m}: served on {label}")
    print("\n" + harness.markdown_table(results))
    print(f"table: {paths['markdown']}   figures: {paths['json']}   chart: {paths['chart']}")
    return results


def _evaluate_all(url, tokenizer, models, names, tasks, include, options: EvalOptions) -> dict:
    from ..eval import harness

    results = {}
    for model, shown in zip(models, names):
        print(f"eval: {shown} on {', '.join(tasks)}", flush=True)
        margs = harness.server_model_args(url, model, str(tokenizer))
        if options.api_key:
            margs["auth_token"] = options.api_key
        results[shown] = harness.evaluate("local-completions", margs, tasks, include, limit=options.limit)
    return results


def _with_own_server(options: EvalOptions, models, tasks, include, out: Path) -> dict:
    """Each server of server_plans in turn (one at a time: one base in memory), every model on the
    base it was trained on; the results in the order of `models`."""
    results = {}
    for i, plan in enumerate(server_plans(options, models)):
        print(f"eval: server {i + 1} on {plan.label}: {', '.join(plan.models)}", flush=True)
        results.update(_on_server(plan, options, tasks, include, out / "work" / f"tokenizer-{i}"))
    return {m: results[m] for m in models}


def _on_server(plan: ServerPlan, options: EvalOptions, tasks, include, tokenizer: Path) -> dict:
    from ..app import ServeConfig, build_server

    app, engine = build_server(ServeConfig(base=plan.base, dtype=options.dtype, quant_type=plan.quant_type,
                                           max_batch=8, adapters=plan.adapters))
    try:
        served = [engine.registry.base_name if s is None else s for s in plan.models.values()]
        if options.tokenizer:
            tokenizer = Path(options.tokenizer)
        else:
            engine.tokenizer.save_pretrained(str(tokenizer))
        with _Uvicorn(app) as url:
            return _evaluate_all(url, tokenizer, served, list(plan.models), tasks, include, options)
    finally:
        engine.stop()


def _merge_include(ours: Path, theirs: Path) -> Path:
    """One include folder holding the shipped tasks and links to the user's YAML files."""
    if not theirs.is_dir():
        raise FileNotFoundError(f"--include-path '{theirs}' is not a folder")
    for item in theirs.iterdir():
        link = ours / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    return ours


class _Uvicorn:
    """uvicorn serving `app` on a free loopback port in a thread; yields the /v1 URL."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the evaluation server did not start")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.thread.is_alive():
            print("qforge eval: the server thread did not stop in 10 s", file=sys.stderr)
