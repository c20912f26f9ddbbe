"""Serve the base model and many LoRA adapters behind an OpenAI-compatible API.

One base is shared by every adapter: quantised at load (--quant-type, default nf4), as stored
(--quant-type none: a merged model, a full fine-tune, the base of BF16-LoRA adapters), or a folder
already stored 4-bit / HQQ / compressed-tensors, served as stored. Concurrent requests for different adapters run in the
same continuously batched forward passes (each row its own adapter). Routes: /v1/models,
/v1/completions, /v1/chat/completions (stream: true for server-sent events), /v1/adapters
(POST {name, path} loads, DELETE unloads), /v1/usage, /metrics (Prometheus), /health.

Security: with --api-key (repeatable) or QFORGE_API_KEY (comma-separated) every route but /health
needs 'Authorization: Bearer KEY'. Those are user keys: each sees its own usage and models and
manages only the adapters it registered. Operator keys (--operator-key, QFORGE_OPERATOR_KEY) also
manage the server-wide adapters, see every key's usage and read /metrics. --api-keys-file FILE
gives keys with roles off the command line: one 'KEY ROLE NAME' per line (ROLE operator or user). Binding to a non-loopback address without a key is refused
unless --insecure. Adapters loaded at run time must lie inside --adapter-root (without it, run-time
loading is off); --adapter NAME=DIR folders are trusted.

Bounded work: a request asking more than --max-request-tokens (embeddings' input tokens summed;
completions' and chats' (prompt + max_tokens) x n) or scoring a prompt longer than
--max-scored-tokens (echo with logprobs) is a 400 before any forward; embeddings run in chunks.
Connections: headers must arrive within --header-timeout and bodies within --body-timeout, and at
most --max-connections are open (--max-connections-per-client from one address); one more is
answered 503 and closed.

With --jobs the same server also runs OpenAI's files and fine-tuning jobs API (/v1/files,
/v1/fine_tuning/jobs) and a dashboard at /: a worker subprocess trains queued jobs one at a time on
the base, state lives in SQLite under --data-dir, and each finished job's model
(ft:<base>:<suffix>:<job id>) is served at once. The worker's trainers use half the cores
(--worker-threads) and the server the rest, so training does not starve serving; on a GPU
--worker-memory-fraction bounds the trainers' share of its memory.

  qforge serve --base smollm2 --adapter demo=runs/demo/adapter --adapter-root runs
  qforge serve --jobs --data-dir ~/.qforge

This module only maps the flags (and the QFORGE_* environment) to a qforge.app.ServeConfig
and runs it; `qforge eval` and the tests build a ServeConfig directly.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..devices import DTYPES, add_device_argument
from ..model.serving import SERVE_QUANT_TYPES
from .argtypes import port_number, positive_int, positive_seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="smollm2",
                        help="base model: 'smollm2', a model folder, a 4-bit folder, a .gguf file or a Hugging Face "
                             "Hub id ORG/NAME (the local cache first)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id --base (default: main)")
    parser.add_argument("--name", default=None, help="model name of the base in the API (default: from --base)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve the PEFT adapter in DIR as model NAME (repeatable)")
    parser.add_argument("--adapter-root", default=None, metavar="DIR",
                        help="folder that run-time adapter loads (POST /v1/adapters) must lie inside")
    parser.add_argument("--strict-bases", action="store_true",
                        help="refuse an adapter whose qforge_base.json records another base quantisation than "
                             "the served base's (default: register it with a warning, shown in /v1/adapters)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on (default: 8000)")
    parser.add_argument("--max-loaded-adapters", type=positive_int, default=16,
                        help="adapters kept in memory (LRU; default: 16)")
    parser.add_argument("--max-dedicated-models", type=positive_int, default=2,
                        help="whole models (full fine-tuning jobs' results) loaded beside the base at once, each "
                             "with its own engine (LRU; default: 2)")
    parser.add_argument("--max-batch", type=positive_int, default=32,
                        help="requests decoded together (1: one at a time; default: 32)")
    parser.add_argument("--max-queue", type=positive_int, default=256,
                        help="waiting requests before answering 429 (default: 256)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="context length (default: the model's)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="compute dtype (default: bfloat16)")
    parser.add_argument("--quant-type", choices=SERVE_QUANT_TYPES, default="nf4",
                        help="how a plain (unquantised) model folder's base is served: quantised at load to "
                             "nf4/fp4/hqq4/hqq3/hqq2, or 'none': its weights as stored, in --dtype (a merged "
                             "model, a full fine-tune, the base of BF16-LoRA adapters). A folder already stored "
                             "4-bit, HQQ or compressed-tensors is served as stored whatever this says "
                             "(default: nf4)")
    add_device_argument(parser)
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="accepted bearer key of role user (repeatable; also QFORGE_API_KEY, comma-separated; "
                             "default: none)")
    parser.add_argument("--operator-key", action="append", default=[], metavar="KEY",
                        help="accepted bearer key of role operator: server-wide adapters, every key's usage, "
                             "/metrics (repeatable; also QFORGE_OPERATOR_KEY; default: none)")
    parser.add_argument("--api-keys-file", default=None, metavar="FILE",
                        help="keys with roles, one 'KEY ROLE NAME' per line, ROLE operator (admin) or user "
                             "(default: none)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without an API key")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="server log level")
    parser.add_argument("--jobs", action="store_true", help="also run the fine-tuning job service and the dashboard")
    parser.add_argument("--data-dir", default="~/.qforge", metavar="DIR",
                        help="with --jobs: where the job database, uploads and job folders live")
    parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                        help="with --jobs: memory a job may use, e.g. 16GB (default: the RAM available); a job "
                             "that names no method gets QLoRA, its first event saying whether the plan fits this budget")
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="with --jobs: postgresql://... job database shared by several replicas and workers "
                             "(also QFORGE_DATABASE_URL; default: SQLite under --data-dir)")
    parser.add_argument("--no-worker", action="store_true",
                        help="with --jobs: run no worker here (`qforge worker` processes train the jobs)")
    parser.add_argument("--max-file-mb", type=positive_int, default=64,
                        help="with --jobs: the largest upload, in MiB (default: 64)")
    parser.add_argument("--max-request-tokens", type=positive_int, default=32768,
                        help="work one request may ask: embeddings' input tokens summed; completions' and chats' "
                             "(prompt + max_tokens) x n (default: 32768; more: 400)")
    parser.add_argument("--max-scored-tokens", type=positive_int, default=4096,
                        help="echo with logprobs: the most tokens of one scored prompt (default: 4096)")
    parser.add_argument("--max-connections", type=positive_int, default=1000,
                        help="open connections in all; one more is answered 503 and closed (default: 1000, kept "
                             "below the file-descriptor limit)")
    parser.add_argument("--max-connections-per-client", type=positive_int, default=128,
                        help="open connections from one client address (default: 128)")
    parser.add_argument("--header-timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                        help="a request's headers must arrive within this, trickled or not (default: 10)")
    parser.add_argument("--body-timeout", type=positive_seconds, default=60.0, metavar="SECONDS",
                        help="a request's body must arrive within this of its start (default: 60)")
    parser.add_argument("--max-jobs-per-key", type=positive_int, default=20, metavar="N",
                        help="with --jobs: jobs one key may have validating, queued or running at once; more "
                             "are refused with 429 (default: 20)")
    from .worker import add_limit_arguments
    add_limit_arguments(parser, default_threads="half the cores, at least 1; the server keeps the others",
                        prefix="with --jobs: ")


def _env_keys(name: str) -> list[str]:
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]


def api_keys(args: argparse.Namespace) -> list[str]:
    """The plain user keys (flags, then QFORGE_API_KEY)."""
    return [k for k in args.api_key if k] + _env_keys("QFORGE_API_KEY")


def all_keys(args: argparse.Namespace) -> list:
    """Every accepted key with its role (qforge.serve.auth.ApiKey): user keys, operator keys, the file's."""
    from ..serve.auth import ApiKey, read_keys_file

    keys = [ApiKey(k, "user", f"user{i + 1}") for i, k in enumerate(api_keys(args))]
    operators = [k for k in args.operator_key if k] + _env_keys("QFORGE_OPERATOR_KEY")
    keys += [ApiKey(k, "operator", f"operator{i + 1}") for i, k in enumerate(operators)]
    if args.api_keys_file:
        keys += read_keys_file(args.api_keys_file)
    seen = set()
    for k in keys:
        if k.key in seen:
            raise ValueError("the same API key is given twice (flags, environment or --api-keys-file)")
        seen.add(k.key)
    return keys


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter expects NAME=DIR, got '{spec}'")
        out.append((name, Path(folder)))
    return out


def serve_config(args: argparse.Namespace):
    """The qforge.app.ServeConfig these flags (and the QFORGE_* environment) give."""
    from ..plan import parse_gpu
    from ..app import ServeConfig

    return ServeConfig(
        base=args.base, revision=args.revision, name=args.name, adapters=parse_adapters(args.adapter),
        adapter_root=args.adapter_root, dtype=args.dtype, quant_type=args.quant_type, device=args.device,
        max_loaded_adapters=args.max_loaded_adapters, strict_bases=args.strict_bases,
        max_dedicated_models=args.max_dedicated_models, max_batch=args.max_batch, max_queue=args.max_queue,
        max_model_len=args.max_model_len, api_keys=all_keys(args), host=args.host, port=args.port,
        insecure=args.insecure, log_level=args.log_level, jobs=args.jobs, data_dir=Path(args.data_dir),
        memory_budget=parse_gpu(args.memory_budget) if args.memory_budget else None,
        database_url=args.database_url or os.environ.get("QFORGE_DATABASE_URL") or None,
        start_worker=not args.no_worker, max_file_mb=args.max_file_mb, max_jobs_per_key=args.max_jobs_per_key,
        worker_threads=args.worker_threads,
        worker_memory_fraction=args.worker_memory_fraction, disk_full_retries=args.disk_full_retries,
        disk_full_backoff=args.disk_full_backoff, disk_full_wait=args.disk_full_wait,
        max_processes_per_job=args.max_processes_per_job,
        max_request_tokens=args.max_request_tokens, max_scored_tokens=args.max_scored_tokens,
        max_connections=args.max_connections, max_connections_per_client=args.max_connections_per_client,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout)


def jobs_config(args: argparse.Namespace):
    """The jobs service's config these flags give (qforge.app.jobs_config of serve_config)."""
    from ..app import jobs_config as config_of
    return config_of(serve_config(args))


def run(args: argparse.Namespace) -> int:
    from ..app import run_server

    run_server(serve_config(args))
    return 0
