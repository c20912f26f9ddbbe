"""Helpers for the job service tests (the tiny model folder comes from tests/fixtures.py): small
chat files, the service in-process (uvicorn in a thread, the worker a real subprocess) or the
whole `qforge serve --jobs` as a subprocess, and polling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.fixtures import tiny_model_folder  # noqa: F401 (the jobs tests import it from here)
from tests.serve.helpers import LiveServer, free_port

REPO = Path(__file__).resolve().parents[2]
TINY_HP = {"method": "qlora", "rank": 4, "batch_size": 2, "max_seq_len": 64, "save_every": 1,
           "compute_dtype": "float32"}


def chat_rows(n: int = 8) -> list[dict]:
    names = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
    return [{"messages": [{"role": "user", "content": f"Who is {names[i % 10]}?"},
                          {"role": "assistant", "content": f"{names[i % 10]} is a friend number {i}."}]}
            for i in range(n)]


def pair_rows(n: int = 8) -> list[dict]:
    """OpenAI's preference rows: the right answer preferred over a wrong one."""
    names = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
    return [{"input": {"messages": [{"role": "user", "content": f"How old is {names[i % 10]}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"{names[i % 10]} is {20 + i}."}],
             "non_preferred_output": [{"role": "assistant", "content": f"{names[i % 10]} is {90 - i}."}]}
            for i in range(n)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class InProcessService:
    """`qforge serve --jobs`'s build path in this process, served by uvicorn in a thread; the worker
    and trainers are real subprocesses. `settings`: more ServeConfig fields (start_worker=False, ...)."""

    def __init__(self, base, data_dir: Path, keys=(), **settings):
        from qforge.app import ServeConfig, build_server

        cfg = ServeConfig(base=str(base), jobs=True, data_dir=Path(data_dir), dtype="float32", api_keys=list(keys),
                          **settings)
        self.app, self.engine = build_server(cfg)
        self.jobs = self.app.state.jobs
        self.live = LiveServer(self.app)

    def __enter__(self) -> "InProcessService":
        self.live.__enter__()
        self.url, self.root = self.live.url, self.live.root
        return self

    def __exit__(self, *exc) -> None:
        self.jobs.stop()
        self.live.__exit__(*exc)
        self.engine.stop()


class ServerProcess:
    """`python -m qforge serve --jobs` as a subprocess on a free loopback port."""

    def __init__(self, base, data_dir: Path, log: Path, keys=()):
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        cmd = [sys.executable, "-m", "qforge", "serve", "--base", str(base), "--jobs", "--data-dir", str(data_dir),
               "--port", str(self.port), "--dtype", "float32", "--log-level", "warning"]
        for key in keys:
            cmd += ["--api-key", key]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "QFORGE_API_KEY": ""})

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                return httpx.get(self.root + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(ready, timeout, 0.5, "the server to answer /health")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def job_create_body(file_id: str, model: str, **hp) -> dict:
    return {"model": model, "training_file": file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {**TINY_HP, **hp}}}}
