"""A training in a child process, and its result read back: the one way the jobs worker (a
trainer per job attempt) and the method bench (a process per method) run a training apart.

    parent: start_child(module, args, log) -> Popen ... wait / follow ... read_result(result.json)
    child:  `python -m module args` trains (qforge.train.run), then write_result(result.json, outcome)

A fresh process gives a training its own peak memory and lets the parent stop it (SIGINT: the
loop checkpoints and exits) or survive its death (the OOM killer): the result file exists only
when the child finished, and it is written atomically."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULT_NAME = "result.json"


def child_env(extra: dict | None = None) -> dict:
    """The child's environment: this one, unbuffered output (its log is followed while it runs),
    no progress bars and no tokenizer threads, then `extra`."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def start_child(module: str, args: list[str], log_path: Path, env: dict | None = None,
                new_session: bool = False) -> subprocess.Popen:
    """`python -m module ARGS` with stdout and stderr appended to `log_path` and no stdin.
    new_session: in a process group of its own (signalled as a whole, apart from the parent's)."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=new_session, env=child_env(env))


def read_result(path: Path) -> dict | None:
    """The outcome a child wrote, or None when it wrote none (it died, or has not finished)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_result(path: Path, outcome: dict) -> None:
    """In the child: write its outcome atomically (a partial file is never read as a result).
    Raises qforge.fileio.DiskFull when there is no room for it."""
    from ..fileio import atomic_write_bytes
    atomic_write_bytes(Path(path), json.dumps(outcome, indent=2).encode())


def train_in_child(module: str, args: list[str], result_path: Path, log_path: Path, env: dict | None = None,
                   timeout: float | None = None) -> tuple[int, dict | None]:
    """Run the child to its end: (exit status, its result or None). A stale result file is removed
    first, so a result is always this run's."""
    Path(result_path).unlink(missing_ok=True)
    proc = start_child(module, args, log_path, env)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return code, read_result(result_path)
