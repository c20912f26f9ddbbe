"""Run fine-tuning jobs from a shared job database: one of any number of workers, on any machines.

Each worker claims the oldest queued job (SELECT ... FOR UPDATE SKIP LOCKED), holds a lease on it
that it renews every --poll seconds, and trains it in a subprocess, writing checkpoints, metrics and
the adapter under --storage (a folder every worker and `qforge serve` replica mounts). A job whose
worker stops renewing its lease (killed, frozen, cut off) is taken over by another worker after
--lease-seconds and resumes from its last checkpoint.

  qforge worker --database-url postgresql://qforge@db:5432/qforge --storage /mnt/qforge
  qforge serve --jobs --database-url postgresql://qforge@db:5432/qforge --data-dir /mnt/qforge --no-worker

Without --database-url the worker serves the SQLite store under --storage (one worker per folder).
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
    parser.add_argument("--worker-threads", type=positive_int, default=None,
                        help="CPU threads a trainer may use, leaving the rest to serving (default: torch's choice)")
    parser.add_argument("--worker-memory-fraction", type=fraction, default=None,
                        help="share of the GPU's memory a trainer may take, in (0, 1] (default: no bound)")


def run(args: argparse.Namespace) -> int:
    from ..jobs.pg import open_store
    from ..jobs.worker import Worker

    url = args.database_url or os.environ.get("QFORGE_DATABASE_URL") or None
    store = open_store(args.storage, url)
    if hasattr(store, "lease_s"):
        store.lease_s = args.lease_seconds
    env = {}
    if url:
        env["QFORGE_DATABASE_URL"] = url
    if args.worker_threads:
        env |= {"QFORGE_TRAIN_THREADS": str(args.worker_threads), "OMP_NUM_THREADS": str(args.worker_threads)}
    if args.worker_memory_fraction:
        env["QFORGE_TRAIN_MEMORY_FRACTION"] = str(args.worker_memory_fraction)
    Worker(store, None, args.poll, args.cancel_grace, trainer_env=env).run()
    return 0
