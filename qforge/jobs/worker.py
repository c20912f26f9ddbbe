"""The worker's loop: runs fine-tuning jobs one at a time, each in a training subprocess it can stop.

Processes (`qforge serve --jobs`):
  server   the API; qforge.jobs.supervisor.WorkerSupervisor starts the worker and starts it again
           whenever it exits unasked (kill -9 included).
  worker   `qforge worker` (flags: qforge.commands.worker): this loop. Claims the next queued job (round robin by owner)
           atomically, starts a trainer for it, turns the trainer's metrics.jsonl lines and
           checkpoint folders into events and checkpoint rows while it runs, and records the
           outcome. Holds an exclusive lock on the data dir (SQLite store).
  trainer  qforge.jobs.trainer_child (started through qforge.train.child): the training run on the
           job's config.yaml (resume "auto": from a checkpoint when there is one), in its own process
           group; writes result.json at the end.
Worker and trainer die with their parent (PR_SET_PDEATHSIG), so killing the server leaves no
training running behind it.

Crash recovery: a job stays 'running' until its outcome is recorded. A new worker claims such a job
before any queued one, kills its trainer if one is somehow still alive, and starts a new trainer,
which resumes from the last checkpoint (the loop's checkpoints are written atomically). Metric events
are keyed by step and checkpoint rows by (job, step), so the replayed steps add nothing twice.
A trainer that dies by itself (OOM killer, a crash) is restarted the same way, at most
MAX_CRASHES times.

Disk full: a trainer that runs out of space (ENOSPC, torch's "enforce fail at inline_container.cc"
from its zip writer, SQLite's "database or disk is full") ends its attempt with outcome 'disk_full'
(the checkpoint being written is removed whole by the atomic write). The worker names it in the
job's events, keeps the job, waits with a doubling back-off until the storage has room again
(twice the newest checkpoint, at least MIN_FREE_BYTES), then resumes it from its last intact
checkpoint; after `disk_full_retries` disk-full attempts in a row, or `disk_full_wait_s` without
room, the job fails with error code 'disk_full'. Temporary files of interrupted writes in the job's
folder are removed before every attempt (the worker holds the job: nothing else writes there).

Threads and memory: `--worker-threads N` runs every trainer with torch.set_num_threads(N) (and
OMP_NUM_THREADS), `--worker-memory-fraction F` with torch.cuda.set_per_process_memory_fraction(F) on
CUDA; the trainer's first event says what it runs with.

Cancel: the API sets status 'cancelled'; the worker sees it within `poll_s` and sends SIGINT to the
trainer's process group: the loop saves a checkpoint after the current step and exits (SIGKILL after
`cancel_grace_s`, to the trainer and every process under it). Checkpoints are kept.

Several processes: a job whose hyperparameters ask for n_processes N > 1 (at most the worker's
--max-processes-per-job) trains in N ranks that torchrun starts on this machine (qforge.jobs.ranks,
in place of the trainer; the 4-bit base sharded across them). Rank 0 writes the same files and
events as a one-process trainer, so following, cancel, crash recovery and the outcome are the
same; a rank that dies counts as a trainer crash, named in the job's events. The worker still runs
one job at a time: a job's N processes share its --worker-threads (each rank takes 1/N) and, on
GPUs, each rank takes its own device (LOCAL_RANK) with the same memory fraction.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import traceback
from pathlib import Path

from .db import DatabaseError
from .limits import (DISK_FULL_BACKOFF_S, DISK_FULL_EXIT, DISK_FULL_RETRIES, DISK_FULL_WAIT_S, MAX_BACKOFF_S,
                     MIN_FREE_BYTES, trainer_env)
from .pg import worker_env
from .processes import kill_tree, signal_group
from .progress import Progress, metric_event, results_csv  # noqa: F401 (the worker's, and tests')
from .store import JobStore, derived_id, fine_tuned_model_name, now, pid_alive
from .ranks import RANKS_MODULE, job_processes
from .trainer_child import DB_ERRORS, DB_ERRORS_T, TRAINER_MODULE, first_line

MAX_CRASHES = 3
DB_MAX_BACKOFF_S = 30.0


def disk_nearly_full(folder: Path) -> bool:
    from ..fileio import LOW_SPACE_BYTES, free_bytes
    free = free_bytes(folder)
    return free is not None and free < LOW_SPACE_BYTES


def is_database_error(exc: BaseException) -> bool:
    """A database that is down, unreachable or locked (retried), as opposed to a bug (not retried)."""
    from ..fileio import is_disk_full
    if isinstance(exc, (DatabaseError, *DB_ERRORS_T)):
        return not is_disk_full(exc)
    return isinstance(exc, sqlite3.OperationalError) and not is_disk_full(exc)


def folder_bytes(path: Path) -> int:
    total = 0
    for f in Path(path).rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            pass
    return total


def log(message: str) -> None:
    try:
        print(time.strftime("%Y-%m-%d %H:%M:%S"), f"[worker {os.getpid()}]", message, flush=True)
    except OSError:
        pass  # the log's disk is full: the work goes on


def trainer_processes(job_id: str) -> list[int]:
    """The pids on this machine whose command line runs `job_id`'s trainer: the one-process trainer,
    or the launcher of a job in several processes and each of its ranks."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if job_id in args and (TRAINER_MODULE in args or RANKS_MODULE in args):
            pids.append(int(cmdline.parent.name))
    return pids


def kill_stale_trainer(pid: int | None, job_id: str) -> None:
    """SIGKILL what a dead worker left of `job_id`'s trainer, if anything still runs: its recorded
    `pid` and any rank of it (found by their command lines, which name the trainer's module and the
    job: a recycled pid is never hit), and wait for them to go."""
    stale = trainer_processes(job_id)
    for each in stale:
        kill_tree(each)
    deadline = time.monotonic() + 10
    while any(pid_alive(each) for each in stale) and time.monotonic() < deadline:
        time.sleep(0.05)


class Worker:
    def __init__(self, store: JobStore, parent_pid: int | None = None, poll_s: float = 0.5,
                 cancel_grace_s: float = 30.0, trainer_env: dict | None = None,
                 disk_full_retries: int = DISK_FULL_RETRIES, disk_full_backoff_s: float = DISK_FULL_BACKOFF_S,
                 disk_full_wait_s: float = DISK_FULL_WAIT_S, max_processes: int = 1):
        self.store, self.parent_pid = store, parent_pid
        self.max_processes = max_processes  # a job's n_processes at most (--max-processes-per-job)
        self.poll_s, self.cancel_grace_s = poll_s, cancel_grace_s
        self.trainer_env = trainer_env or {}  # e.g. the thread bound of --worker-threads
        self.disk_full_retries, self.disk_full_backoff_s = disk_full_retries, disk_full_backoff_s
        self.disk_full_wait_s = disk_full_wait_s
        self.stopping = False
        self.lease_lost = False
        self.db_delay: float | None = None  # the current back-off while the database is unavailable

    def should_stop(self) -> bool:
        if self.parent_pid and os.getppid() != self.parent_pid:
            self.stopping = True  # the server is gone (where PR_SET_PDEATHSIG is not available)
        return self.stopping

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        lock = self._lock() if self.store.single_worker else True
        if lock is None:
            return
        log(f"serving jobs from {self.store.root}")
        self.loop()
        log("stopped")

    def loop(self) -> None:
        """Claim and run jobs until asked to stop. An unreachable database is waited out here (with
        a doubling back-off), never a reason to exit: the job it interrupted stays 'running' with
        this worker, which claims it again when the database is back (its result, if the trainer
        wrote one, is recorded without training again)."""
        while not self.should_stop():
            try:
                job = self.store.claim_next_job(os.getpid())
            except (sqlite3.Error, DatabaseError, *DB_ERRORS_T) as exc:  # a busy, full or unreachable database
                self.db_backoff(exc, "no job claimed this time")
                continue
            self.db_delay = None
            if job is None:
                time.sleep(self.poll_s)
                continue
            try:
                self.run_job(job)
            except Exception as exc:  # noqa: BLE001 - a bug in one job's bookkeeping must not stop the queue
                log(f"job {job['id']}: {traceback.format_exc()}")
                from ..fileio import is_disk_full
                if is_disk_full(exc):  # nothing could be recorded: the job stays ours and resumes
                    time.sleep(self.disk_full_backoff_s)
                    continue
                if is_database_error(exc):  # the job stays ours; claimed again once the database answers
                    self.db_backoff(exc, f"job {job['id']} interrupted")
                    continue
                self.with_database(lambda: self.store.update_job(
                    job["id"], only_if_status=("running",), status="failed", finished_at=now(), train_pid=None,
                    error={"code": "internal_error", "param": None,
                           "message": "the worker failed while running the job"},
                    events=[("The job failed: internal error in the worker", "failed")], level="error"),
                    "recording the job's failure")

    def db_backoff(self, exc: BaseException, what: str) -> None:
        """Wait after a database error: 1 s, doubling to DB_MAX_BACKOFF_S while it lasts (stop watched)."""
        self.db_delay = min(DB_MAX_BACKOFF_S, (self.db_delay or 0.5) * 2)
        log(f"{what}: the job database is unavailable ({first_line(exc)}); trying again in {self.db_delay:.0f} s")
        deadline = time.monotonic() + self.db_delay
        while time.monotonic() < deadline and not self.should_stop():
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def with_database(self, call, what: str):
        """call() until the database answers (back-off between tries); None if the worker stops first."""
        while True:
            try:
                result = call()
                self.db_delay = None
                return result
            except Exception as exc:  # noqa: BLE001
                if not is_database_error(exc):
                    raise
                if self.should_stop():
                    log(f"{what}: not done, the worker is stopping ({first_line(exc)})")
                    return None
                self.db_backoff(exc, what)

    def _lock(self):
        """An exclusive lock on the data dir: one worker per store, whatever starts them."""
        fh = open(self.store.root / "worker.lock", "a")
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fh
            except BlockingIOError:
                if self.should_stop():
                    return None
                time.sleep(0.2)

    def run_job(self, job: dict) -> None:
        """Train the claimed job to its outcome; a disk-full attempt waits for room and runs again."""
        from ..fileio import clean_temporaries, is_disk_full

        job_id = job["id"]
        job_dir = self.store.job_dir(job_id)
        full, returncode = 0, None
        if job["resumed"]:
            kill_stale_trainer(job["stale_train_pid"], job_id)
            if _read_result(job_dir).get("status") == "succeeded":  # trained; only recording it was cut short
                log(f"job {job_id}: its trainer's result is on the storage; recording it")
                returncode = 0
            else:
                self.store.add_event(job_id, "Resuming the job from its last checkpoint "
                                     f"(attempt {job['attempts']})", level="warn")
        while True:
            for leftover in clean_temporaries(job_dir):  # this worker holds the job: no write is in flight
                log(f"job {job_id}: removed '{leftover.relative_to(job_dir)}', left by an interrupted write")
            if returncode is None:  # (else the training succeeded and only recording its outcome ran out of room)
                returncode = self.attempt(job, job_dir)
                if returncode is None:
                    return  # the lease went to another worker
            try:  # the result stays in the job's folder (shared storage) until this records it
                why = self.with_database(lambda: self.finish(job, returncode, job_dir), f"job {job_id}: recording")
            except Exception as exc:  # noqa: BLE001 - anything but a full disk goes up to run()
                if not is_disk_full(exc):
                    raise
                why = f"no space left on the device while recording the job's outcome ({first_line(exc)})"
                if _read_result(job_dir).get("status") != "succeeded":
                    returncode = None
            else:
                returncode = None
            if why is None:
                return
            full += 1
            if not self.wait_for_space(job, full, why):
                return

    def attempt(self, job: dict, job_dir: Path) -> int | None:
        """One trainer run of the job: its exit status, or None when the lease was lost meanwhile."""
        job_id = job["id"]
        from ..train.child import RESULT_NAME, start_child

        (job_dir / RESULT_NAME).unlink(missing_ok=True)
        nproc = job_processes(job)
        log(f"job {job_id}: training (attempt {job['attempts']}" + (f", {nproc} processes)" if nproc > 1 else ")"))
        args = [str(job_dir), job_id, str(self.store.root), str(os.getpid())]
        if nproc > 1 and nproc > self.max_processes:  # the API checks its own limit; this worker's may be lower
            self.store.update_job(job_id, only_if_status=("running",), status="failed", finished_at=now(),
                                  train_pid=None, error={
                                      "code": "invalid_value", "param": "hyperparameters.n_processes",
                                      "message": f"hyperparameters.n_processes: the job asks for {nproc} "
                                                 f"processes; its worker runs at most {self.max_processes} "
                                                 "(--max-processes-per-job)"},
                                  events=[("The job failed: more processes than the worker runs", "failed")],
                                  level="error")
            return None
        module, args = (RANKS_MODULE, [*args, str(nproc)]) if nproc > 1 else (TRAINER_MODULE, args)
        proc = start_child(module, args, job_dir / "train.log", {**worker_env(self.store), **self.trainer_env},
                           new_session=True)
        self.lease_lost = False
        try:
            self.store.update_job(job_id, train_pid=proc.pid)
            self.follow(job, proc)
        finally:
            if proc.poll() is None:  # the worker itself failed: never leave a trainer running unwatched
                kill_tree(proc.pid)
                proc.wait()
        if self.lease_lost:  # another worker runs the job now: its outcome is that worker's to record
            log(f"job {job_id}: lease lost to another worker; trainer stopped, nothing recorded")
            return None
        return proc.returncode

    # ---- a full disk ---------------------------------------------------------------------------
    def space_needed(self, job_dir: Path) -> int:
        """Free bytes a retry needs: twice the newest checkpoint (its write and the next), at least MIN_FREE_BYTES."""
        from ..train.checkpoint import latest_checkpoint
        latest = latest_checkpoint(job_dir / "run" / "checkpoints")
        return max(MIN_FREE_BYTES, 2 * folder_bytes(latest) if latest else 0)

    def wait_for_space(self, job: dict, count: int, why: str) -> bool:
        """After the job's `count`-th disk-full attempt in a row: say so in its events and wait (a
        doubling back-off, the lease renewed, cancel and stop watched) until the storage has room,
        then True (run it again). False when the job was cancelled, the worker is stopping or the
        lease is lost, or when the job failed here for good (too many times, or no room for too long)."""
        job_id, job_dir = job["id"], self.store.job_dir(job["id"])
        log(f"job {job_id}: disk full ({count}): {why}")
        if count > self.disk_full_retries:
            self.fail_disk_full(job, f"{why}; the disk was full on {count} attempts in a row")
            return False
        need = self.space_needed(job_dir)
        named = (f"Disk full: {why}. Nothing half-written is kept; the job waits until the storage has "
                 f"{need / 2 ** 20:.0f} MiB free and resumes from its last checkpoint "
                 f"(retry {count} of {self.disk_full_retries})")
        recorded = self._record(lambda: self.store.update_job(
            job_id, only_if_status=("running",), train_pid=None, estimated_finish=None, level="warn",
            events=[(named, None)]))
        delay = self.disk_full_backoff_s * 2 ** (count - 1)
        started = time.monotonic()
        while True:
            until = time.monotonic() + min(delay, MAX_BACKOFF_S)
            while time.monotonic() < until:
                if not self._still_holding(job):
                    return False
                time.sleep(min(self.poll_s, max(0.0, until - time.monotonic())))
            if not self._still_holding(job):
                return False
            free = shutil.disk_usage(job_dir).free
            if free >= need:
                if not recorded:  # the database shares the full disk: the event is written now there is room
                    self._record(lambda: self.store.add_event(job_id, named, level="warn"))
                self._record(lambda: self.store.add_event(
                    job_id, f"The storage has room again ({free / 2 ** 20:.0f} MiB free); resuming the job from "
                    "its last checkpoint", level="info"))
                return True
            if time.monotonic() - started > self.disk_full_wait_s:
                self.fail_disk_full(job, f"{why}; the storage had only {free / 2 ** 20:.0f} MiB free after "
                                    f"{self.disk_full_wait_s:.0f} s of waiting (needs {need / 2 ** 20:.0f} MiB)")
                return False
            delay *= 2

    @staticmethod
    def _record(write) -> bool:
        """An event written while the disk may still be full: False when it could not be, and the wait goes on."""
        from ..fileio import is_disk_full
        try:
            write()
            return True
        except Exception as exc:  # noqa: BLE001
            if not is_disk_full(exc):
                raise
            log(f"event not recorded (disk full): {exc!r}")
            return False

    def _still_holding(self, job: dict) -> bool:
        """While waiting for room: renew the lease; False (after recording why) when the job was
        cancelled, the worker is stopping, or another worker holds the job now."""
        try:
            if not self.store.renew_lease(job["id"], os.getpid()):
                log(f"job {job['id']}: lease lost to another worker while waiting for disk space")
                return False
            status = self.store.job_status(job["id"])
        except Exception as exc:  # noqa: BLE001 - the database is unreachable or full: keep waiting
            log(f"job {job['id']}: lease not renewed this time: {exc!r}")
            status = "running"
        if status == "cancelled":
            self.finish(job, 0, self.store.job_dir(job["id"]))
            return False
        if status != "running":
            return False
        if self.should_stop():
            self.store.update_job(job["id"], train_pid=None, events=[(
                "The worker is stopping; the job will resume from its last checkpoint", None)], level="warn")
            return False
        return True

    def fail_disk_full(self, job: dict, why: str) -> None:
        message = f"disk full: {why}; free some space and create the job again"
        self.store.update_job(job["id"], only_if_status=("running",), status="failed", finished_at=now(),
                              train_pid=None, estimated_finish=None,
                              error={"code": "disk_full", "message": message, "param": None},
                              events=[(f"The job failed: {message}", "failed")], level="error")

    def follow(self, job: dict, proc: subprocess.Popen) -> None:
        """Until the trainer exits: record its progress, and stop it (SIGINT, then SIGKILL after the
        grace period) when the job is cancelled or the worker is asked to stop."""
        progress = Progress(self.store, job)
        signalled_at, killed = None, False
        while proc.poll() is None:
            try:
                if not self.store.renew_lease(job["id"], os.getpid()):
                    self.lease_lost = True
                    kill_tree(proc.pid)  # never two trainers on one job
                    proc.wait()
                    return
            except Exception as exc:  # noqa: BLE001 - the database is unreachable: try again next poll
                log(f"job {job['id']}: lease not renewed this time: {exc!r}")
            try:
                progress.sync()
                stop = self.should_stop() or self.store.job_status(job["id"]) != "running"
            except (sqlite3.Error, OSError, ValueError, DB_ERRORS) as exc:  # a busy database, a folder being replaced
                log(f"job {job['id']}: progress not recorded this time: {exc!r}")
                stop = self.should_stop()
            if stop and signalled_at is None:
                signal_group(proc.pid, signal.SIGINT)  # the loop checkpoints after this step and exits
                signalled_at = time.monotonic()
            elif signalled_at is not None and not killed and time.monotonic() - signalled_at > self.cancel_grace_s:
                kill_tree(proc.pid)  # every rank too: each runs in a session of its own
                killed = True
            time.sleep(self.poll_s)
        try:  # the database may be down now: waited for, as the outcome is (no later sync reads these lines)
            self.with_database(progress.sync, f"job {job['id']}: recording its last progress")
        except (sqlite3.Error, OSError, ValueError) as exc:  # a folder being replaced: the next attempt syncs it
            log(f"job {job['id']}: last progress not recorded: {exc!r}")

    def finish(self, job: dict, returncode: int, job_dir: Path) -> str | None:
        """Record the attempt's outcome. Returns why, when the attempt ran out of disk space (the
        job is still running: the caller waits for room and runs it again), else None."""
        job_id = job["id"]
        result = _read_result(job_dir)
        status = self.store.job_status(job_id)
        log(f"job {job_id}: trainer exited ({returncode}), result {result['status']}, job {status}")
        if status == "cancelled":
            kept = len(self.store.list_checkpoints(job_id, limit=10**6)[0])
            self.store.update_job(job_id, train_pid=None, estimated_finish=None,
                                  events=[(f"The job was cancelled; its {kept} checkpoint(s) are kept", "cancelled")])
        elif status != "running":
            return
        elif result["status"] == "disk_full":
            return result["error"]["message"]
        elif result["status"] == "crashed" and returncode == DISK_FULL_EXIT:
            return "no space left on the device for the trainer's result file"
        elif result["status"] == "crashed" and disk_nearly_full(job_dir):  # its log could not say why: room decides
            return f"the trainer stopped (exit status {returncode}) with no room left to write its log or result"
        elif result["status"] == "succeeded":
            self.succeed(job, result)
        elif result["status"] == "failed":
            error = result["error"]
            self.store.update_job(job_id, only_if_status=("running",), status="failed", finished_at=now(),
                                  error=error, train_pid=None, estimated_finish=None,
                                  events=[(f"The job failed: {error['message']}", "failed")], level="error")
        elif self.stopping:
            self.store.update_job(job_id, train_pid=None, events=[(
                "The worker is stopping; the job will resume from its last checkpoint", None)], level="warn")
        else:  # a rank that died is named in its launcher's result
            self.crashed(job, returncode, (result.get("error") or {}).get("message"))
        return None

    def crashed(self, job: dict, returncode: int, how: str | None = None) -> None:
        crashes = job["crashes"] + 1
        how = how or (f"signal {-returncode}" if returncode and returncode < 0 else f"exit status {returncode}")
        if crashes >= MAX_CRASHES:
            message = f"the training process died ({how}) {crashes} times"
            self.store.update_job(job["id"], only_if_status=("running",), status="failed", finished_at=now(),
                                  crashes=crashes, train_pid=None, estimated_finish=None,
                                  error={"code": "training_crashed", "message": message, "param": None},
                                  events=[(f"The job failed: {message}", "failed")], level="error")
        else:
            self.store.update_job(job["id"], crashes=crashes, train_pid=None, level="warn", events=[(
                f"The training process died ({how}); it will resume from the last checkpoint", None)])
            time.sleep(min(2.0, self.poll_s * 4))

    def succeed(self, job: dict, result: dict) -> None:
        job_id, job_dir = job["id"], self.store.job_dir(job["id"])
        data = results_csv(job_dir / "run")
        file_id = derived_id("file", job_id, "results")
        from ..fileio import atomic_write_bytes
        atomic_write_bytes(self.store.file_path(file_id, "fine-tune-results"), data)
        results = {"file_id": file_id, "filename": "step_metrics.csv", "purpose": "fine-tune-results",
                   "size": len(data), "rows": None, "fmt": "csv"}
        model = fine_tuned_model_name(job["model"], job["suffix"], job_id)
        summary = result.get("summary") or {}
        tokens = summary.get("trained_tokens", summary.get("tokens"))  # the loss's tokens (qforge.train.loop)
        self.store.complete_job(job_id, model, tokens, results)


def _read_result(job_dir: Path) -> dict:
    """The trainer's outcome; 'crashed' when it wrote none."""
    from ..train.child import RESULT_NAME, read_result
    return read_result(job_dir / RESULT_NAME) or {"status": "crashed"}
