"""What bounds a job worker: its trainers' CPU threads and GPU memory share, and how it waits out a
full disk (defaults shared by `qforge worker`, `qforge serve --jobs` and qforge.jobs.worker; no
heavy imports, so the command line stays quick)."""
from __future__ import annotations

import os

DISK_FULL_EXIT = 75  # a trainer's exit status when there was no room even for its result.json
MIN_FREE_BYTES = 16 * 2 ** 20
DISK_FULL_RETRIES = 5
DISK_FULL_BACKOFF_S = 5.0
DISK_FULL_WAIT_S = 3600.0
MAX_BACKOFF_S = 300.0


def trainer_env(threads: int | None = None, memory_fraction: float | None = None) -> dict:
    """The environment that bounds a trainer: its CPU threads and its share of the GPU's memory."""
    env = {}
    if threads:
        env |= {"QFORGE_TRAIN_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads)}
    if memory_fraction:
        env["QFORGE_TRAIN_MEMORY_FRACTION"] = str(memory_fraction)
    return env


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_worker_threads() -> int:
    """Threads for a worker that shares the machine with the server: half the cores (at least 1), so
    serving keeps the other half (on 2 cores: one each)."""
    return max(1, cpu_cores() // 2)


def serving_threads(worker_threads: int) -> int:
    """The server's torch threads beside a local worker of `worker_threads`: the cores it leaves (at least 1)."""
    return max(1, cpu_cores() - worker_threads)
