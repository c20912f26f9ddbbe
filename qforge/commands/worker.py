"""Run fine-tuning jobs from a shared job database: one of any number of workers, on any machines.

Each worker claims the oldest queued job (SELECT ... FOR UPDATE SKIP LOCKED), holds a lease on it
that it renews every --poll seconds, and trains it in a subprocess, writing checkpoints, metrics and
the adapter under --storage (a folder every worker and `qforge serve` replica mounts). A job whose
worker stops renewing its lease (killed, frozen, cut off) is taken over by another worker after
--lease-seconds and resumes from its last checkpoint.

  qforge worker --database-url postgresql://qforge@db:5432/qforge --storage /mnt/qforge
  qforge serve --jobs --database-url postgresql://qforge@db:5432/qforge --data-dir /mnt/qforge --no-worker

Without --database-url the worker serves the SQLite store under --storage (one worker per folder).
--worker-threads / --worker-memory-fraction bound each trainer when the worker shares its machine with
a server; a job that runs out of disk space waits for room and resumes (--disk-full-*).
The URL may also come from QFORGE_DATABASE_URL (so its password is not on the command line).
"""
from __future__ import annotations

import argparse
import os

from .argtypes import fraction, positive_int, positive_seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="postgresql://USER[:PASSWORD]@HOST:PORT/DB of the shared job database (default: "
                             "QFORGE_DATABASE_URL, else the SQLite store under --storage)")
    parser.add_argument("--storage", required=True, metavar="DIR",
                        help="the shared folder of uploads and job folders (the serve replicas' --data-dir)")
    parser.add_argument("--poll", type=positive_seconds, default=0.5,
                        help="seconds between queue polls and lease renewals (default: 0.5)")
    parser.add_argument("--lease-seconds", type=positive_seconds, default=30.0,
                        help="a job whose worker has not renewed its lease for this long is taken over "
                             "(default: 30)")
    parser.add_argument("--cancel-grace", type=positive_seconds, default=30.0,
                        help="seconds a cancelled job's trainer gets to checkpoint before SIGKILL (default: 30)")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # `qforge serve --jobs`'
    add_limit_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser, default_threads: str = "torch's choice",
                        prefix: str = "") -> None:
    """The flags that bound a worker's trainers and its disk-full retries (`qforge worker`, `qforge serve --jobs`)."""
    from ..jobs.limits import DISK_FULL_BACKOFF_S, DISK_FULL_RETRIES, DISK_FULL_WAIT_S, MAX_BACKOFF_S
    parser.add_argument("--worker-threads", type=positive_int, default=None,
                        help=f"{prefix}CPU threads a trainer may use (torch.set_num_threads), leaving the rest to serving "
                             f"(default: {default_threads})")
    parser.add_argument("--worker-memory-fraction", type=fraction, default=None,
                        help=f"{prefix}share of the GPU's memory a trainer may take, in (0, 1] "
                             "(torch.cuda.set_per_process_memory_fraction; on a CPU accepted and recorded; "
                             "default: no bound)")
    parser.add_argument("--max-processes-per-job", type=positive_int, default=1, metavar="N",
                        help=f"{prefix}processes a job may ask to train in (hyperparameters' n_processes; torchrun on "
                             "this machine, QLoRA's 4-bit base sharded across them; default: 1)")
    parser.add_argument("--disk-full-retries", type=positive_int, default=DISK_FULL_RETRIES,
                        help=f"{prefix}disk-full attempts in a row before a job fails (default: {DISK_FULL_RETRIES})")
    parser.add_argument("--disk-full-backoff", type=positive_seconds, default=DISK_FULL_BACKOFF_S,
                        help=f"{prefix}seconds before the first look for free space after a disk-full attempt, doubling "
                             f"up to {MAX_BACKOFF_S:.0f} (default: {DISK_FULL_BACKOFF_S:g})")
    parser.add_argument("--disk-full-wait", type=positive_seconds, default=DISK_FULL_WAIT_S,
                        help=f"{prefix}seconds a job waits for free space before it fails (default: {DISK_FULL_WAIT_S:g})")


def run(args: argparse.Namespace) -> int:
    """The worker's loop (qforge.jobs.worker) over the store, until SIGTERM/SIGINT. Started by a
    server's supervisor (hidden --parent-pid), it dies with that server."""
    from ..jobs.limits import trainer_env
    from ..jobs.pg import open_store, worker_env
    from ..jobs.processes import die_with_parent
    from ..jobs.worker import Worker

    if args.parent_pid:
        die_with_parent(args.parent_pid)
    url = args.database_url or os.environ.get("QFORGE_DATABASE_URL") or None
    store = open_store(args.storage, url)
    if hasattr(store, "lease_s"):
        store.lease_s = args.lease_seconds
    env = {**worker_env(store), **trainer_env(args.worker_threads, args.worker_memory_fraction)}
    Worker(store, args.parent_pid, args.poll, args.cancel_grace, trainer_env=env,
           disk_full_retries=args.disk_full_retries, disk_full_backoff_s=args.disk_full_backoff,
           disk_full_wait_s=args.disk_full_wait, max_processes=args.max_processes_per_job).run()
    return 0
