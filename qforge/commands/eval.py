"""Evaluate the base model and adapters with lm-evaluation-harness through one qforge server.

  qforge eval --tasks qforge_mc,qforge_gen --models base,a,b --adapter a=runs/a/adapter --adapter b=runs/b/adapter
  qforge eval --url http://127.0.0.1:8000/v1 --tokenizer runs/merged --models smollm2,ft:smollm2::ftjob-1 --tasks ...

Without --url, a server is started in this process on a free loopback port (the base from --base,
the adapters from --adapter, --dtype compute) and stopped at the end; every model is evaluated on it
by lm-eval's `local-completions` backend (log-likelihood tasks via `echo` + `logprobs`, generation
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"comma-separated lm-eval tasks (default {DEFAULT_TASKS})")
    parser.add_argument("--models", default="base",
                        help="comma-separated served model names; 'base' is the base model (default: base)")
    parser.add_argument("--base", default="smollm2",
                        help="base model to serve: 'smollm2' (default), a model folder or a .gguf file")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve this PEFT adapter as model NAME (repeatable; default: none)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="float32",
                        help="compute dtype of the started server (default float32)")
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
    options = EvalOptions(base=args.base, adapters=parse_adapters(args.adapter), dtype=args.dtype, url=args.url,
                          api_key=args.api_key, tokenizer=args.tokenizer, include_path=args.include_path,
                          limit=args.limit, output_dir=args.output_dir)
    evaluate_models(options, models, tasks)
    return 0


def evaluate_adapters(base: str, adapters: dict[str, str], tasks: list[str], output_dir: str | Path,
                      limit: int | None = None, dtype: str = "float32") -> dict:
    """The base and each adapter (name -> PEFT folder) on one started server: what `qforge bench
    --eval-tasks` calls. Returns {model: {task: {metric: value}}} and writes the report."""
    options = EvalOptions(base=base, adapters=[(name, Path(folder)) for name, folder in adapters.items()],
                          dtype=dtype, limit=limit, output_dir=str(output_dir))
    return evaluate_models(options, ["base", *adapters], tasks)


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
    paths = harness.write_report(results, out, {"tasks": tasks, "models": list(results)})
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
    from ..app import ServeConfig, build_server

    app, engine = build_server(ServeConfig(base=options.base, dtype=options.dtype, max_batch=8,
                                           adapters=options.adapters))
    base = engine.registry.base_name
    served = [base if m == "base" else m for m in models]
    unknown = [m for m in served if m != base and m not in engine.registry]
    if unknown:
        engine.stop()
        raise ValueError(f"--models names {unknown}, which the server does not serve (give them with --adapter)")
    tokenizer = Path(options.tokenizer) if options.tokenizer else out / "work" / "tokenizer"
    if not options.tokenizer:
        engine.tokenizer.save_pretrained(str(tokenizer))
    with _Uvicorn(app) as url:
        try:
            return _evaluate_all(url, tokenizer, served, models, tasks, include, options)
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
