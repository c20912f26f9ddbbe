"""Soak test: `qforge serve --jobs` under a bounded loopback load with faults injected, for a fixed time.

Set-up: a tiny random Llama folder (SmolLM2's tokenizer) as the base, two random PEFT adapters (a,
b) served from the command line, an operator key and two user keys. Load (--clients threads):
streaming chats over tiny/a/b (a quarter of them hang up after the first chunk), uploads of small
training files, fine-tuning jobs (all the same data and seed, a few steps), cancellation of some.
Faults, one every --fault-every seconds at random: kill -9 of the worker, kill -9 of the server
(restarted at once on the same data dir), a corrupt adapter registered by a user (truncated weights:
must be a 4xx), and a full disk: the data dir (database, uploads, job folders) is a tmpfs of
--tmpfs-mb MiB, which the fault fills to the last byte, holds full for 5-20 s, then frees. Mounting
needs root: as another user the script runs itself again in a user and mount namespace
(`unshare -rm`); where neither works there is no full-disk fault and the summary says so. While the
disk is full, 507 answers naming the full disk (code disk_full) are expected and counted apart
(`disk_full_507`); any other 5xx, or a 507 outside a fill, counts in errors_5xx.

Issue 28's faults (benchmarks/soak_faults.py): with the job database on a throw-away PostgreSQL
(--database postgres, the default where Debian's postgresql is installed) it is stopped for 5-20 s
(503 database_unavailable answers meanwhile are counted apart as db_down_503); a full disk while a
job trains (fill-training); slow clients dripping header lines while /health is asked; memory-bomb
requests (embeddings and completions as large as a body may be). A server that dies outside a
kill-server fault is started again and counted (server_deaths).

At the end (load stopped, jobs given --drain seconds to finish): every upload not deleted must read
back byte for byte, every job must exist and end succeeded or cancelled (or failed for a reason
that names the client's input), and every succeeded job's adapter must be bit-identical to the
others (same data, same seed). The last line:

  requests=N errors_5xx=E jobs_lost=J files_lost=F adapters_mismatched=M events_lost=V

(events_lost: steps of a succeeded job's results file without exactly one metrics event.)

  python benchmarks/soak.py --seconds 600 [--clients 4] [--fault-every 30] [--job-every 120] [--drain 1200]
      [--tmpfs-mb 1024] [--database auto|sqlite|postgres] [--faults kill-worker,...] [--slow-sockets 200]
      [--bomb-tokens 512]
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.soak_faults import (PgOutage, events_lost, is_db_down_answer, memory_bombs,  # noqa: E402
                                    slow_clients, wait_for_running_job)

FAULTS = ["kill-worker", "kill-server", "corrupt-adapter", "fill-disk", "fill-training", "pg-outage", "slow-clients",
          "memory-bomb"]

OPERATOR, USERS = "soak-operator-key", ["soak-user-key-1", "soak-user-key-2"]
HP = {"method": "qlora", "rank": 4, "batch_size": 2, "max_seq_len": 64, "save_every": 1, "compute_dtype": "float32",
      "n_epochs": 1}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qforge serve --jobs` as a subprocess; restartable on the same port and data dir."""

    def __init__(self, base: Path, adapters: Path, data: Path, log: Path, database_url: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "qforge", "serve", "--base", str(base), "--jobs", "--data-dir", str(data),
                    "--port", str(self.port), "--dtype", "float32", "--log-level", "warning", "--max-queue", "64",
                    "--adapter-root", str(adapters), "--adapter", f"a={adapters / 'a'}",
                    "--adapter", f"b={adapters / 'b'}", "--operator-key", OPERATOR]
        for key in USERS:
            self.cmd += ["--api-key", key]
        if database_url:
            self.cmd += ["--database-url", database_url]
        self.log, self.data = open(log, "ab"), data
        self.proc: subprocess.Popen | None = None
        self.up = threading.Event()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "QFORGE_API_KEY": "", "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.up.set()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the server did not come up")

    def worker_pids(self) -> list[int]:
        """The job worker(s) this server started (its children running `python -m qforge worker`)."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        out = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"qforge" in cmd and b"worker" in cmd:  # `python -m qforge worker` (trainers run qforge.jobs.trainer_child)
                out.append(pid)
        return out

    def kill(self) -> None:
        self.up.clear()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.kill()


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.errors_5xx = self.refused = self.disk_full_507 = self.db_down_503 = 0
        self.server_deaths = 0
        self.disk_full = threading.Event()  # set while a fill fault holds the data dir full (and just after)
        self.db_down = threading.Event()    # set while a pg-outage fault holds the database down (and just after)
        self.stats: dict = {}               # the slow-clients and memory-bomb faults' numbers
        self.fives: list[str] = []
        self.files: dict[str, tuple[str, bytes]] = {}  # file id -> (key, bytes)
        self.jobs: dict[str, tuple[str, bool]] = {}    # job id -> (key, cancel asked)
        self.faults: dict[str, int] = {}

    def answer(self, what: str, r: httpx.Response) -> httpx.Response:
        with self.lock:
            self.requests += 1
            if r.status_code == 507 and self.disk_full.is_set() and is_disk_full_answer(r):
                self.disk_full_507 += 1
            elif r.status_code == 503 and self.db_down.is_set() and is_db_down_answer(r):
                self.db_down_503 += 1
            elif r.status_code >= 500:
                self.errors_5xx += 1
                if not r.is_stream_consumed:  # a streamed chat's error body is still unread
                    r.read()
                self.fives.append(f"{what}: {r.status_code} {r.text[:200]}")
        return r


def is_disk_full_answer(r: httpx.Response) -> bool:
    """An OpenAI error object naming the full disk."""
    try:
        if not r.is_stream_consumed:
            r.read()
        error = r.json()["error"]
        return error["code"] == "disk_full" and "disk is full" in error["message"]
    except (ValueError, KeyError, TypeError, httpx.HTTPError):
        return False


def training_bytes(n: int = 8) -> bytes:
    from tests.jobs.helpers import chat_rows, jsonl
    return jsonl(chat_rows(n))


def client_loop(server: Server, tally: Tally, stop: threading.Event, seed: int, job_every: float) -> None:
    rng = random.Random(seed)
    key = USERS[seed % 2]
    headers = {"Authorization": f"Bearer {key}"}
    next_job = time.monotonic() + rng.uniform(0, job_every)
    data = training_bytes()
    while not stop.is_set():
        if not server.up.wait(5):
            continue
        try:
            roll = rng.random()
            if time.monotonic() > next_job:
                next_job = time.monotonic() + job_every
                files = {"file": ("t.jsonl", data)}
                r = tally.answer("upload", httpx.post(server.url + "/v1/files", headers=headers, files=files,
                                                      data={"purpose": "fine-tune"}, timeout=60))
                if r.status_code == 200:
                    with tally.lock:
                        tally.files[r.json()["id"]] = (key, data)
                    body = {"model": "tiny", "training_file": r.json()["id"], "seed": 11,
                            "method": {"type": "supervised", "supervised": {"hyperparameters": HP}}}
                    j = tally.answer("job", httpx.post(server.url + "/v1/fine_tuning/jobs", headers=headers,
                                                       json=body, timeout=60))
                    if j.status_code == 200:
                        cancel = rng.random() < 0.25
                        with tally.lock:
                            tally.jobs[j.json()["id"]] = (key, cancel)
                        if cancel:
                            tally.answer("cancel", httpx.post(server.url + f"/v1/fine_tuning/jobs/{j.json()['id']}"
                                                              "/cancel", headers=headers, timeout=60))
            elif roll < 0.8:
                model = rng.choice(["tiny", "a", "b"])
                body = {"model": model, "messages": [{"role": "user", "content": f"Say {rng.randrange(100)}"}],
                        "max_tokens": 8, "temperature": 0, "stream": True}
                with httpx.stream("POST", server.url + "/v1/chat/completions", headers=headers, json=body,
                                  timeout=60) as r:
                    tally.answer("chat", r)
                    for i, _ in enumerate(r.iter_lines()):
                        if rng.random() < 0.25 and i == 1:
                            break  # hang up mid-stream
            else:
                tally.answer("list", httpx.get(server.url + "/v1/fine_tuning/jobs", headers=headers, timeout=60))
                tally.answer("models", httpx.get(server.url + "/v1/models", headers=headers, timeout=60))
        except httpx.HTTPError:
            with tally.lock:
                tally.refused += 1  # the server was being killed or restarted: no answer, not a 5xx
            time.sleep(0.2)


def corrupt_adapter(server: Server, adapters: Path, tally: Tally, n: int) -> None:
    import shutil
    bad = adapters / f"broken{n}"
    shutil.copytree(adapters / "a", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    r = tally.answer("corrupt-adapter", httpx.post(server.url + "/v1/adapters", timeout=60, json={
        "name": f"broken{n}", "path": bad.name}, headers={"Authorization": f"Bearer {USERS[0]}"}))
    if not 400 <= r.status_code < 500:
        print(f"corrupt adapter answered {r.status_code}: {r.text[:200]}", flush=True)


def fill_disk(data: Path, tally: Tally, hold: float) -> None:
    """Fill the data dir's tmpfs to the last byte, hold it full for `hold` seconds, free it."""
    filler = data / "soak-filler.bin"
    tally.disk_full.set()
    try:
        with open(filler, "wb", buffering=0) as fh:
            for size in (2 ** 20, 2 ** 12, 1):
                block = bytes(size)
                try:
                    while True:
                        fh.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        print(f"fill-disk: {filler.stat().st_size / 2 ** 20:.0f} MiB written; full for {hold:.0f} s", flush=True)
        time.sleep(hold)
    finally:
        filler.unlink(missing_ok=True)
        time.sleep(3)  # answers to requests that met the full disk may still arrive
        tally.disk_full.clear()


def faults(server: Server, adapters: Path, tally: Tally, stop: threading.Event, every: float, seed: int,
           kinds: list[str], args, pg=None) -> None:
    rng = random.Random(seed)
    n = 0
    while not stop.wait(rng.uniform(every / 2, every * 1.5)):
        kind = rng.choice(kinds)
        n += 1
        try:
            if kind == "pg-outage":
                pg.outage(rng.uniform(5, 20))
            elif kind == "fill-training":
                if not wait_for_running_job(server.url, USERS):
                    print("fill-training: no job was running; filling anyway", flush=True)
                fill_disk(server.data, tally, rng.uniform(5, 20))
            elif kind == "slow-clients":
                slow_clients(server.port, server.url, args.slow_sockets, 20.0, tally.stats)
            elif kind == "memory-bomb":
                codes = memory_bombs(server.url, USERS[n % 2], args.bomb_tokens, tally.answer)
                tally.stats.setdefault("memory_bomb_statuses", []).extend(codes)
            elif kind == "kill-worker":
                for pid in server.worker_pids():
                    os.kill(pid, signal.SIGKILL)
            elif kind == "kill-server":
                server.kill()
                server.start()
            elif kind == "fill-disk":
                fill_disk(server.data, tally, rng.uniform(5, 20))
            else:
                corrupt_adapter(server, adapters, tally, n)
        except (httpx.HTTPError, OSError, RuntimeError) as exc:
            print(f"fault {kind}: {exc!r}", flush=True)
            if kind == "kill-server" and not server.up.is_set():
                server.start()
        tally.faults[kind] = tally.faults.get(kind, 0) + 1
        if server.proc.poll() is not None:  # died by itself (out of memory?): counted, and started again
            print(f"the server died during {kind} ({server.proc.returncode}); starting it again", flush=True)
            with tally.lock:
                tally.server_deaths += 1
            server.up.clear()
            server.start()


def get(url: str, key: str, tries: int = 5) -> httpx.Response:
    """A GET of the final check, tried again when the loaded machine answers slowly."""
    for attempt in range(tries):
        try:
            return httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        except httpx.HTTPError:
            if attempt == tries - 1:
                raise
            time.sleep(2)


def check(server: Server, tally: Tally, drain: float) -> tuple[int, int, int, dict, int]:
    """(jobs_lost, files_lost, adapters_mismatched) once the jobs have had `drain` seconds."""
    deadline = time.monotonic() + drain
    finals: dict[str, dict] = {}
    while time.monotonic() < deadline:
        finals = {}
        for job_id, (key, _) in tally.jobs.items():
            r = get(server.url + f"/v1/fine_tuning/jobs/{job_id}", key)
            finals[job_id] = r.json() if r.status_code == 200 else {"status": f"http {r.status_code}"}
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in finals.values()):
            break
        time.sleep(2)
    jobs_lost = 0
    for job_id, job in finals.items():
        if job["status"] in ("succeeded", "cancelled"):
            continue
        jobs_lost += 1
        print(f"job {job_id} lost: {job['status']} {job.get('error')}", flush=True)
    files_lost = 0
    for file_id, (key, data) in tally.files.items():
        r = get(server.url + f"/v1/files/{file_id}/content", key)
        if r.status_code != 200 or r.content != data:
            files_lost += 1
            print(f"file {file_id} lost: {r.status_code}", flush=True)
    adapters = {}
    for job_id, job in finals.items():
        if job["status"] == "succeeded":
            path = server.data / "jobs" / job_id / "run" / "adapter" / "adapter_model.safetensors"
            adapters[job_id] = path.read_bytes() if path.is_file() else b""
    values = list(adapters.values())
    reference = max(set(values), key=values.count) if values else b""
    mismatched = sum(1 for v in values if v != reference or not v)
    outcomes: dict[str, int] = {}
    for job in finals.values():
        outcomes[job["status"]] = outcomes.get(job["status"], 0) + 1
    lost_events = sum(events_lost(server.url, tally.jobs[job_id][0], job) for job_id, job in finals.items()
                      if job["status"] == "succeeded")
    return jobs_lost, files_lost, mismatched, outcomes, lost_events


def mount_tmpfs(folder: Path, size_mb: int) -> tuple[bool, str]:
    """Mount a tmpfs of `size_mb` MiB on `folder`: (True, "") or (False, why not)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    except OSError as exc:
        return False, f"mount: {exc}"
    return (True, "") if r.returncode == 0 else (False, (r.stderr.strip() or f"mount exited {r.returncode}")[:200])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, required=True, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default: 4)")
    parser.add_argument("--fault-every", type=float, default=30.0, help="mean seconds between faults (default: 30)")
    parser.add_argument("--job-every", type=float, default=120.0,
                        help="seconds between a client's jobs (default: 120: on 2 shared cores the worker, one "
                             "job at a time, keeps up)")
    parser.add_argument("--drain", type=float, default=1200.0,
                        help="seconds the jobs still queued at the end get to finish (default: 1200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the load and the faults (default: 0)")
    parser.add_argument("--tmpfs-mb", type=int, default=1024,
                        help="size of the tmpfs the data dir lives on, for the full-disk fault (0: no tmpfs, no "
                             "full-disk fault; default: 1024)")
    parser.add_argument("--database", choices=["auto", "sqlite", "postgres"], default="auto",
                        help="the job database: a throw-away PostgreSQL (with the pg-outage fault) or SQLite under "
                             "the data dir (auto: PostgreSQL where Debian's postgresql is installed)")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated faults to draw from (default: all of {', '.join(FAULTS)})")
    parser.add_argument("--slow-sockets", type=int, default=200,
                        help="connections the slow-clients fault opens (default: 200)")
    parser.add_argument("--bomb-tokens", type=int, default=512,
                        help="token ids per input of the memory-bomb requests (default: 512, the soak model's "
                             "context)")
    args = parser.parse_args(argv)
    wanted = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(wanted) - set(FAULTS))
    if unknown:
        parser.error(f"--faults: unknown {', '.join(unknown)}; choose from {', '.join(FAULTS)}")

    import torch
    from qforge.model.load import load_model
    from tests.jobs.helpers import tiny_model_folder
    from tests.serve.helpers import save_random_adapters

    work = Path(tempfile.mkdtemp(prefix="qforge-soak-"))
    tmpfs, why_not = mount_tmpfs(work / "data", args.tmpfs_mb) if args.tmpfs_mb > 0 else (False, "--tmpfs-mb 0")
    if not tmpfs and os.geteuid() != 0 and not os.environ.get("QFORGE_SOAK_UNSHARED") and shutil.which("unshare"):
        shutil.rmtree(work, ignore_errors=True)  # again, as root of a user and mount namespace of our own
        os.environ["QFORGE_SOAK_UNSHARED"] = "1"
        os.execvp("unshare", ["unshare", "-rm", sys.executable, *sys.argv])
    print(f"full-disk fault: {'on, data dir on a ' + str(args.tmpfs_mb) + ' MiB tmpfs' if tmpfs else 'off (' + why_not + ')'}",
          flush=True)
    pg, pg_why = None, "--database sqlite"
    if args.database != "sqlite":
        try:
            pg = PgOutage()
        except (RuntimeError, OSError) as exc:
            pg_why = str(exc)
            if args.database == "postgres":
                raise
    kinds = [k for k in wanted if not (k.startswith("fill-") and not tmpfs) and not (k == "pg-outage" and pg is None)]
    print(f"job database: {'PostgreSQL (pg-outage fault on)' if pg else 'SQLite (' + pg_why + ')'}; "
          f"faults: {', '.join(kinds)}", flush=True)
    base = tiny_model_folder(work / "tiny")
    model, _ = load_model(str(base), compute_dtype=torch.float32)
    adapters = work / "adapters"
    save_random_adapters(model, adapters, ["a", "b"])
    del model
    server = Server(base, adapters, work / "data", work / "server.log", pg.url if pg else None)
    server.start()
    tally, stop = Tally(), threading.Event()
    if pg is not None:
        tally.db_down = pg.down
    threads = [threading.Thread(target=client_loop, args=(server, tally, stop, args.seed * 100 + i, args.job_every),
                                daemon=True) for i in range(args.clients)]
    threads.append(threading.Thread(target=faults, args=(server, adapters, tally, stop, args.fault_every, args.seed,
                                                         kinds, args, pg), daemon=True))
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join(120)
    if not server.up.is_set():
        server.start()
    try:
        jobs_lost, files_lost, mismatched, outcomes, lost_events = check(server, tally, args.drain)
    finally:
        server.stop()
        if pg is not None:
            pg.stop()
        if tmpfs:
            keep = work / "data-copy"
            shutil.copytree(work / "data", keep, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "tokenizer*"))
            subprocess.run(["umount", str(work / "data")], check=False)
    for line in tally.fives[:10]:
        print("5xx:", line)
    print(json.dumps({"work": str(work), "jobs": len(tally.jobs), "job_outcomes": outcomes, "files": len(tally.files),
                      "faults": tally.faults, "no_answer": tally.refused, "disk_full_507": tally.disk_full_507,
                      "db_down_503": tally.db_down_503, "server_deaths": tally.server_deaths, **tally.stats,
                      "full_disk_fault": "tmpfs" if tmpfs else f"off ({why_not})",
                      "database": "postgresql" if pg else "sqlite"}))
    print(f"requests={tally.requests} errors_5xx={tally.errors_5xx} jobs_lost={jobs_lost} files_lost={files_lost} "
          f"adapters_mismatched={mismatched} events_lost={lost_events}")
    return 0 if (tally.errors_5xx, jobs_lost, files_lost, mismatched, lost_events) == (0, 0, 0, 0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
