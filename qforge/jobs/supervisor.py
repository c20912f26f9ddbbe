"""The supervisor, in the server process (`qforge serve --jobs`): runs the job worker as
`python -m qforge worker --storage DATA_DIR --parent-pid PID ...` (the flags parsed by
qforge.commands.worker alone) and starts it again whenever it exits unasked (kill -9 included)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .processes import signal_group


def worker_args(config) -> list[str]:
    """The local worker's flags from the jobs service's qforge.jobs.api.JobsConfig, beyond the
    supervisor's own: the disk-full ones, and the processes a job may train in (the API's bound on
    n_processes is its worker's too)."""
    return [*config.worker_args, "--max-processes-per-job", str(config.max_processes_per_job)]


class WorkerSupervisor:
    """Runs the worker subprocess and starts it again when it exits unasked (after `restart_delay_s`,
    doubling while it keeps dying within a few seconds, up to a minute)."""

    def __init__(self, data_dir: Path, poll_s: float = 0.5, cancel_grace_s: float = 30.0,
                 restart_delay_s: float = 1.0, worker_threads: int | None = None,
                 worker_memory_fraction: float | None = None, extra_args: list[str] = ()):
        self.data_dir = Path(data_dir)
        self.args = ["--poll", str(poll_s), "--cancel-grace", str(cancel_grace_s), *extra_args]
        if worker_threads:
            self.args += ["--worker-threads", str(worker_threads)]
        if worker_memory_fraction:
            self.args += ["--worker-memory-fraction", str(worker_memory_fraction)]
        self.cancel_grace_s, self.restart_delay_s = cancel_grace_s, restart_delay_s
        self.proc: subprocess.Popen | None = None
        self.extra_env: dict = {}  # QFORGE_DATABASE_URL for a PostgreSQL store
        self.starts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="qforge-jobs-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> "WorkerSupervisor":
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "worker.log", "ab") as out:
            # this thread spawns every worker: PR_SET_PDEATHSIG follows the spawning thread
            return subprocess.Popen([sys.executable, "-m", "qforge", "worker", "--storage", str(self.data_dir),
                                     "--parent-pid", str(os.getpid()), *self.args],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **self.extra_env})

    def _supervise(self) -> None:
        delay = self.restart_delay_s
        while not self._stop.is_set():
            started = time.monotonic()
            self.proc = self._spawn()
            self.starts += 1
            self.proc.wait()
            if self._stop.is_set():
                break
            quick = time.monotonic() - started < 10
            delay = min(60.0, delay * 2) if quick else self.restart_delay_s
            print(f"qforge jobs: the worker exited ({self.proc.returncode}); restarting in {delay:.0f} s",
                  file=sys.stderr, flush=True)
            self._stop.wait(delay)

    def stop(self) -> None:
        """Stop the worker: it asks a running trainer to checkpoint and exit, then exits itself."""
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.cancel_grace_s + 15)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._thread.is_alive():
            self._thread.join(5)
