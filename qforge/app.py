"""A server built from a plain config: `ServeConfig` holds every setting `qforge serve` has, and
`build_server(cfg)` loads the base, registers the adapters and returns the app and its engine.

    flags --(commands/serve.py)--> ServeConfig --build_server--> (FastAPI app, Engine) --run_server--> uvicorn
                      qforge eval, tests, benchmarks --^

The command only maps flags (and the QFORGE_* environment) to a ServeConfig; everything else that
builds a server (`qforge eval`, the tests) builds the config directly. With `jobs` the same app also
runs the files and fine-tuning jobs API (qforge.jobs.api), whose worker trains beside the server.
"""
from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .jobs.limits import DISK_FULL_BACKOFF_S, DISK_FULL_RETRIES, DISK_FULL_WAIT_S


@dataclass
class ServeConfig:
    """Every setting of a server. Sizes in bytes or MiB as named; `api_keys` holds plain strings
    (keys of role user) or qforge.serve.auth.ApiKey (a role and a name each)."""

    base: str = "smollm2"                 # 'smollm2', a model folder, a 4-bit folder, a .gguf file or a Hub id
    revision: str | None = None           # branch, tag or commit of a Hub id base
    name: str | None = None               # the base's model name in the API (None: from `base`)
    adapters: list[tuple[str, Path]] = field(default_factory=list)  # (model name, PEFT folder): trusted
    adapter_root: str | None = None       # run-time adapter loads must lie inside (None: no run-time loads)
    dtype: str = "bfloat16"               # compute dtype, a name of qforge.devices.DTYPES
    quant_type: str = "nf4"               # a plain folder's base at load: nf4|fp4|hqq4|hqq3|hqq2, or "none" (as
                                          # stored, in `dtype`); quantised folders are served as stored
    device: str = "auto"                  # resolved once by qforge.devices.resolve_device
    max_loaded_adapters: int = 16
    strict_bases: bool = False            # refuse (400) an adapter trained on another base than the served one
    max_dedicated_models: int = 2         # whole models (full fine-tunes) loaded beside the base at once (LRU)
    max_batch: int = 32
    max_queue: int = 256
    max_model_len: int | None = None      # context length (None: the model's)
    api_keys: list = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False                # allow a non-loopback host without a key
    log_level: str = "info"
    # the fine-tuning jobs service (with jobs=True)
    jobs: bool = False
    data_dir: Path = Path("~/.qforge")
    memory_budget: int | None = None      # bytes a job may use (None: the RAM available)
    database_url: str | None = None       # postgresql://... (None: SQLite under data_dir)
    start_worker: bool = True             # False: `qforge worker` processes train the jobs
    max_file_mb: int = 64
    max_jobs_per_key: int = 20            # a key's jobs validating, queued or running at once
    worker_threads: int | None = None     # the trainers' CPU threads (None: half the cores)
    worker_memory_fraction: float | None = None
    disk_full_retries: int = DISK_FULL_RETRIES
    disk_full_backoff: float = DISK_FULL_BACKOFF_S
    disk_full_wait: float = DISK_FULL_WAIT_S
    max_processes_per_job: int = 1        # a job's n_processes at most (its worker runs them with torchrun)
    # bounded work per request and per connection (qforge.serve.api.limits, qforge.serve.connections)
    max_request_tokens: int = 32768       # embeddings: inputs' tokens; completions/chat: (prompt + max_tokens) x n
    max_scored_tokens: int = 4096         # echo with logprobs: tokens of each scored prompt
    max_connections: int = 1000           # open connections in all (one more: 503, closed)
    max_connections_per_client: int = 128  # open connections from one client address
    header_timeout: float = 10.0          # seconds for a request's headers, from connection / last response
    body_timeout: float = 60.0            # seconds for its body, from the same start

    def served_name(self) -> str:
        """The base model's name in the API: `name`, else 'smollm2' or the folder / file name."""
        if self.name:
            return self.name
        return self.base if self.base.lower() == "smollm2" else Path(self.base).name.removesuffix(".gguf")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, keys: list, insecure: bool) -> None:
    """ValueError when binding `host` would expose an open server: non-loopback, no key, not insecure."""
    if not keys and not is_loopback(host) and not insecure:
        raise ValueError(f"refusing to serve on non-loopback address '{host}' without an API key: pass --api-key "
                         "(or set QFORGE_API_KEY), or --insecure to accept the risk")


def jobs_config(cfg: ServeConfig):
    """The jobs service's qforge.jobs.api.JobsConfig for this server."""
    from .jobs.api import JobsConfig
    from .jobs.limits import default_worker_threads
    from .model.hub import looks_like_hub_id

    keep = cfg.base.lower() == "smollm2" or looks_like_hub_id(cfg.base)  # a Hub id stays an id for the jobs
    base = cfg.base if keep else str(Path(cfg.base).expanduser().resolve())
    return JobsConfig(data_dir=Path(cfg.data_dir).expanduser(), base_model=base, memory_budget=cfg.memory_budget,
                      max_file_bytes=cfg.max_file_mb * 2 ** 20, database_url=cfg.database_url,
                      max_jobs_per_key=cfg.max_jobs_per_key,
                      start_worker=cfg.start_worker, worker_threads=cfg.worker_threads or default_worker_threads(),
                      worker_memory_fraction=cfg.worker_memory_fraction, worker_args=worker_flags(cfg),
                      max_processes_per_job=cfg.max_processes_per_job)


def worker_flags(cfg: ServeConfig) -> tuple[str, ...]:
    """The disk-full settings as the worker subprocess's flags (its interface is its command line)."""
    return ("--disk-full-retries", str(cfg.disk_full_retries), "--disk-full-backoff", str(cfg.disk_full_backoff),
            "--disk-full-wait", str(cfg.disk_full_wait))


def build_server(cfg: ServeConfig):
    """(app, engine): load the base, register the adapters, build the engine and the app (and start
    the jobs service with `cfg.jobs`, reachable as app.state.jobs)."""
    import torch

    from .devices import resolve_device
    from .model.serving import load_serving_model
    from .serve import AdapterRegistry, Engine, Metrics
    from .serve.dedicated import DedicatedModels, RoutingEngine
    from .serve.api import create_app

    device = resolve_device(cfg.device)  # decided once: the engine runs where the model is
    model, tokenizer = load_serving_model(cfg.base, cfg.quant_type, compute_dtype=getattr(torch, cfg.dtype),
                                          device=device, revision=cfg.revision)
    if tokenizer is None:
        raise ValueError(f"'{cfg.base}' has no tokenizer files; the server needs one")
    metrics = Metrics()
    registry = AdapterRegistry(model, cfg.served_name(), cfg.max_loaded_adapters, cfg.adapter_root, metrics,
                               strict_bases=cfg.strict_bases)
    for name, folder in cfg.adapters:
        registry.add(name, Path(folder), trusted=True)
    engine = Engine(model, tokenizer, registry, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    context_len=cfg.max_model_len, metrics=metrics)
    registry.dedicated = DedicatedModels(getattr(torch, cfg.dtype), device, cfg.max_dedicated_models, cfg.max_batch,
                                         cfg.max_queue)  # full fine-tunes, each its own engine (no gauges)
    engine = RoutingEngine(engine, registry.dedicated)
    extensions, jobs = [], None
    if cfg.jobs:
        from .jobs.api import JobService, install
        jobs = JobService(jobs_config(cfg), registry)
        extensions.append(lambda app, state, caller: install(app, state, caller, jobs))
    app = create_app(engine, registry, api_keys=list(cfg.api_keys), metrics=metrics, extensions=extensions)
    limits = app.state.qforge.limits
    limits.max_request_tokens, limits.max_scored_tokens = cfg.max_request_tokens, cfg.max_scored_tokens
    if jobs is not None:
        registry.forbid(jobs.config.data_dir)  # --adapter-root never reaches another key's job folder
        app.state.qforge.health_checks["jobs_store"] = lambda: jobs_store_problem(jobs)
        jobs.start()
    return app, engine


def jobs_store_problem(jobs) -> str | None:
    """Why the jobs store cannot answer a read now (its database unreachable or corrupt), or None."""
    try:
        jobs.store.get_job("health-check")
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises is the degradation
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None


def share_cores(cfg: ServeConfig) -> tuple[int, int]:
    """The server and its job worker on one machine: the worker's trainers take `worker_threads`
    (default half the cores), the server's torch the cores left; (serving, training) threads."""
    import torch

    from .jobs.limits import default_worker_threads, serving_threads
    training = cfg.worker_threads or default_worker_threads()
    serving = serving_threads(training)
    torch.set_num_threads(serving)
    print(f"qforge serve: {serving} CPU thread(s) for serving, {training} for the job worker's training",
          file=sys.stderr, flush=True)
    return serving, training


def connection_guard(cfg: ServeConfig) -> type:
    """uvicorn's h11 protocol with header/body deadlines and connection caps (qforge.serve.connections);
    the total cap stays below the process's file-descriptor limit."""
    import resource

    from .serve.connections import ConnectionLimits, guarded_protocol
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    total = cfg.max_connections if soft == resource.RLIM_INFINITY else min(cfg.max_connections, max(16, soft - 128))
    return guarded_protocol(ConnectionLimits(total, cfg.max_connections_per_client, cfg.header_timeout,
                                             cfg.body_timeout))


def describe_server(cfg: ServeConfig, adapters: list[str]) -> str:
    """What a started server loaded and where to reach it: the lines `qforge serve` prints before it
    starts answering."""
    host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
    url = f"http://{host}:{cfg.port}"
    stored = "as stored" if cfg.quant_type == "none" else f"{cfg.quant_type} unless stored quantised"
    lines = [f"qforge serve: base '{cfg.served_name()}' from {cfg.base} ({stored}; {cfg.dtype} compute, "
             f"device {cfg.device})",
             f"  adapters: {', '.join(adapters) if adapters else 'none yet'}"
             + (f" (run-time loads under {cfg.adapter_root})" if cfg.adapter_root else ""),
             f"  OpenAI-compatible API: {url}/v1   health: {url}/health"]
    if cfg.jobs:
        lines.append(f"  fine-tuning jobs API: {url}/v1/fine_tuning/jobs   dashboard: {url}/")
    lines.append(f"  keys: {len(cfg.api_keys)}" if cfg.api_keys else "  keys: none (loopback only)")
    return "\n".join(lines)


def run_server(cfg: ServeConfig) -> None:
    """Check the bind and the job database (one line naming what is wrong, before the model loads),
    build the server and run it under uvicorn until stopped."""
    import uvicorn

    check_bind(cfg.host, cfg.api_keys, cfg.insecure)
    if not cfg.api_keys and not is_loopback(cfg.host):
        print(f"qforge serve: warning: serving on {cfg.host} with no API key (--insecure)", file=sys.stderr)
    if cfg.jobs:  # a bad job database fails here, nothing swept
        from .jobs.pg import open_store
        open_store(Path(cfg.data_dir).expanduser(), cfg.database_url)
        if cfg.start_worker:
            share_cores(cfg)
    app, engine = build_server(cfg)
    print(describe_server(cfg, engine.registry.names()), flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, http=connection_guard(cfg))
    finally:
        jobs = getattr(app.state, "jobs", None)
        if jobs is not None:
            jobs.stop()
        engine.stop()
