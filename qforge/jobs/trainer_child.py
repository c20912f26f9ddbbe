"""The trainer: one attempt at a fine-tuning job, in a process of its own that the worker
(qforge.jobs.worker) starts, follows and may stop.

    python -m qforge.jobs.trainer_child JOB_DIR JOB_ID DATA_DIR PARENT_PID

Started by torchrun (qforge.jobs.ranks, a job with n_processes > 1) it is one rank: every rank
trains, sharded (qforge.dist), and rank 0 alone reports events and writes result.json; a rank that
loses contact with another exits with RANK_LOST_EXIT and writes nothing (the job resumes).

It trains the job's config.yaml through the one training-run API (qforge.train.run.prepare; resume
"auto": from a checkpoint when there is one), reports progress messages as the job's events, and
writes result.json (qforge.train.child) with the outcome: succeeded, interrupted, failed (with an
OpenAI-style error), or disk_full. It dies with the worker (PR_SET_PDEATHSIG) and holds a lock on
the job's folder, so two trainers never run one job. Its command line names this module and the
job id: a new worker finds a stale trainer by them (qforge.jobs.worker.kill_stale_trainer).
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import sys
import traceback
from pathlib import Path

from .limits import DISK_FULL_EXIT
from .pg import store_from_env
from .processes import die_with_parent
from .store import JobStore

try:
    from psycopg import Error as DB_ERRORS  # PostgreSQL's errors, when the store is there
except ImportError:  # pragma: no cover - psycopg is a dependency
    DB_ERRORS = sqlite3.Error
DB_ERRORS_T = (DB_ERRORS,)
TRAINER_MODULE = "qforge.jobs.trainer_child"
RANK_LOST_EXIT = 4  # a rank whose collective failed: another rank died first (qforge train's status too)


class RankGone(Exception):
    """Another rank of the job's run died or stopped answering: no outcome to write (the job resumes)."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, at most 200 characters (for a job's events)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _error(code: str, message: str, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param}


def with_tensorboard(cfg):
    """The job's recipe with TensorBoard events in the job's run folder (run/tensorboard) when the
    tensorboard package is installed: the same events `qforge train --report-to tensorboard` writes."""
    import dataclasses
    import importlib.util
    if "tensorboard" in cfg.report_targets() or importlib.util.find_spec("tensorboard") is None:
        return cfg
    return dataclasses.replace(cfg, report_to=",".join(cfg.report_targets() + ["tensorboard"]))


def train(job_dir: Path, job_id: str, store: JobStore | None, group=None) -> dict:
    """Run the job's config.yaml; the outcome as result.json's contents. Messages that advise a
    setting name the jobs API's hyperparameters while it runs (and only then: tests run it in-process).
    `group`: this rank's qforge.dist.Group under torchrun (None: one process); `store` None on the
    ranks that do not report. Raises RankGone when another rank is lost."""
    from ..train.config import INTERFACE
    token = INTERFACE.set("api")
    try:
        return _train(job_dir, job_id, store, group)
    finally:
        INTERFACE.reset(token)


def _train(job_dir: Path, job_id: str, store: JobStore | None, group=None) -> dict:
    from ..train.config import TrainConfig

    cfg = with_tensorboard(TrainConfig.from_yaml(job_dir / "config.yaml"))
    if store is None:  # a rank other than 0: prepare and the loop say nothing here
        return _outcome(cfg, job_dir, lambda text: text, lambda *_: None, group)
    try:
        job = store.get_job(job_id) or {}
        uploads = uploaded_names(store, job)
    except Exception:  # noqa: BLE001 - the database is down: only names in messages are at stake
        job, uploads = {}, (lambda text: text)
    base_name = job.get("model", "the base model")

    def report(message) -> None:
        """Progress messages become the job's events, without the server's paths."""
        text = str(message).strip()
        try:
            print(text, flush=True)
        except OSError:  # train.log's disk is full: the message still becomes an event if it can
            pass
        text = uploads(text.replace(f"{job_dir}/", "").replace(str(job_dir), "."))
        text = text.replace(f"model {cfg.model} ", f"model {base_name} ")
        if text:
            try:
                store.add_event(job_id, text)
            except Exception as exc:  # noqa: BLE001 - a message not recorded (a full disk) never stops training
                print(f"(event not recorded: {exc!r})", flush=True)

    report(resources_message(group.world if group is not None else 1))
    return _outcome(cfg, job_dir, uploads, report, group)


def _outcome(cfg, job_dir: Path, uploads, report, group) -> dict:
    """Prepare, train and save the run (every rank alike); the outcome as result.json's contents."""
    from ..fileio import DiskFull, is_disk_full
    from ..train.data import DataError
    from ..train.loop import TrainingDiverged
    from ..train.run import prepare
    try:
        run = prepare(cfg, log=report, group=group)
        result = run.train()
        return {"status": "interrupted" if result.interrupted else "succeeded", "summary": run.save()}
    except KeyboardInterrupt:  # SIGINT before the loop took it over (while loading)
        return {"status": "interrupted"}
    except DataError as exc:
        message = uploads(str(exc).replace(f"{job_dir}/", ""))
        param = "validation_file" if exc.path and Path(exc.path).name == "valid.jsonl" else "training_file"
        return {"status": "failed", "error": _error(f"invalid_{param}", message, param)}
    except TrainingDiverged as exc:
        return {"status": "failed", "error": _error("training_diverged", str(exc).replace(f"{job_dir}/", ""))}
    except DiskFull as exc:
        traceback.print_exc()
        return {"status": "disk_full", "error": _error("disk_full", exc.strerror.replace(f"{job_dir}/", "")
                                                       .replace("; free some space and try again", ""))}
    except MemoryError:
        return {"status": "failed", "error": _error("out_of_memory", "training ran out of memory; lower "
                                                    "batch_size or max_seq_len, or use method qlora")}
    except Exception as exc:  # noqa: BLE001 - reported to the job's owner, the traceback to train.log
        traceback.print_exc()
        if group is not None and rank_lost(exc):
            raise RankGone(first_line(exc)) from exc
        # whatever library wrapped it (safetensors, torch.save, json, the log): ENOSPC waits for room
        if is_disk_full(exc, job_dir):
            return {"status": "disk_full", "error": _error("disk_full", "no space left on the device while "
                                                           f"training ({first_line(exc)})".replace(f"{job_dir}/", ""))}
        return {"status": "failed", "error": _error("training_error", f"{type(exc).__name__}: {exc}"
                                                    .replace(f"{job_dir}/", ""))}


def rank_lost(exc: BaseException) -> bool:
    """Whether a failure is a lost rank: qforge.dist's RankLost, or torch.distributed's own error
    from FSDP's collectives inside forward and backward."""
    from ..dist import lost_contact
    return lost_contact(exc)


def uploaded_names(store: JobStore, job: dict):
    """A function that names the job's files as their owner uploaded them ('chat.jsonl' for the
    job folder's train.jsonl), so an error points at the file the user has."""
    names = {}
    for key, local in (("training_file", "train.jsonl"), ("validation_file", "valid.jsonl")):
        row = store.get_file(job[key]) if job.get(key) else None
        if row and row.get("filename"):
            names[local] = f"{row['filename']}"
    def rename(text: str) -> str:
        for local, name in names.items():
            text = text.replace(local, name)
        return text
    return rename


def apply_limits() -> None:
    """--worker-threads and --worker-memory-fraction, from the environment the worker gave the trainer.
    The threads are the job's: each of its ranks takes an equal share (at least one)."""
    import torch
    if os.environ.get("QFORGE_TRAIN_THREADS"):  # training leaves cores to serving
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, int(os.environ["QFORGE_TRAIN_THREADS"]) // ranks))
    if os.environ.get("QFORGE_TRAIN_MEMORY_FRACTION") and torch.cuda.is_available():  # the GPU is shared
        torch.cuda.set_per_process_memory_fraction(float(os.environ["QFORGE_TRAIN_MEMORY_FRACTION"]))


def resources_message(processes: int = 1) -> str:
    """What the trainer runs with, for the job's events: its processes, torch threads and GPU memory share."""
    import torch
    text = f"The training process uses {torch.get_num_threads()} CPU thread(s)"
    if processes > 1:
        text = (f"The job trains in {processes} processes, the 4-bit base sharded across them; each uses "
                f"{torch.get_num_threads()} CPU thread(s)")
    fraction = os.environ.get("QFORGE_TRAIN_MEMORY_FRACTION")
    if fraction and torch.cuda.is_available():
        text += f" and at most {float(fraction):g} of the GPU's memory"
    elif fraction:
        text += f"; GPU memory fraction {float(fraction):g} recorded (no CUDA device: not applied)"
    return text


def open_store_waiting(data_dir: Path) -> JobStore:
    """The job store; while its database is down, wait (doubling to 30 s) rather than crash: the
    worker counts a trainer that dies as a crash, and three fail the job."""
    import time
    from .db import DatabaseError
    delay = 1.0
    while True:
        try:
            return store_from_env(data_dir)
        except (DatabaseError, sqlite3.OperationalError, *DB_ERRORS_T) as exc:
            print(f"the job database is unavailable ({first_line(exc)}); trying again in {delay:.0f} s", flush=True)
            time.sleep(delay)
            delay = min(30.0, delay * 2)


def train_main(job_dir: Path, job_id: str, data_dir: Path, parent_pid: int | None) -> int:
    """One attempt at a job, in the process the worker started (or one rank of it, under torchrun):
    train, then write result.json (rank 0)."""
    die_with_parent(parent_pid)
    apply_limits()
    from ..dist import close_group, init_group, launched_by_torchrun
    from ..fileio import DiskFull
    from ..train.child import RESULT_NAME, write_result
    rank = int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    if rank == 0:
        guard = open(job_dir / "trainer.lock", "a")
        try:  # a second trainer on one job (leases make it impossible; this makes it certain) stops here
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (under torchrun the other ranks are stopped with it)
            print(f"another trainer holds job {job_id}; this one exits without training", flush=True)
            return 3
    group = None
    try:
        if launched_by_torchrun():
            from ..train.config import TrainConfig
            group = init_group(device_kind=TrainConfig.from_yaml(job_dir / "config.yaml").device)
        outcome = train(job_dir, job_id, open_store_waiting(data_dir) if rank == 0 else None, group)
    except RankGone as exc:
        print(f"rank {rank}: {exc}; the job resumes from its last checkpoint", flush=True)
        return RANK_LOST_EXIT
    finally:
        if group is not None:
            close_group(group)
    if rank != 0:  # rank 0 reports the job; another rank's own failure still fails its process
        if outcome["status"] in ("succeeded", "interrupted"):
            return 0
        print(f"rank {rank}: {(outcome.get('error') or {}).get('message')}", flush=True)
        return 1
    try:
        write_result(job_dir / RESULT_NAME, outcome)
    except DiskFull as exc:
        print(f"{exc}; the worker waits for room and runs the job again", flush=True)
        return DISK_FULL_EXIT
    return 0


def main(argv: list[str]) -> int:
    """The worker's command line for a trainer: JOB_DIR JOB_ID DATA_DIR PARENT_PID (positional:
    only the worker starts it)."""
    job_dir, job_id, data_dir, parent_pid = argv
    return train_main(Path(job_dir), job_id, Path(data_dir), int(parent_pid) or None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
