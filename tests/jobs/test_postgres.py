"""Scale-out on PostgreSQL: a real server from Debian's package, the store's interface over it
(Alembic migrations, keyed events, SKIP LOCKED claims with leases), and three `qforge worker`
processes on six identical jobs, one worker SIGKILLed mid-step: every job succeeds, every adapter
is bit-identical to an uninterrupted run, and no job ever ran in two trainers at once."""
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qforge.jobs.api import JobBody, JobsConfig, JobService
from qforge.jobs.pg import PgStore, open_store
from qforge.jobs.store import now

from .helpers import REPO, TINY_HP, chat_rows, jsonl, wait_for
from .postgres import Postgres, missing_reason

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")


@pytest.fixture(scope="module")
def postgres():
    server = Postgres().start()
    yield server
    server.stop()


def add_job(store, job_id: str) -> None:
    store.add_job({"id": job_id, "owner": "me", "created_at": now(), "model": "tiny", "training_file": "file-x",
                   "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                   "hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}, "status": "queued"})


def test_the_store_interface_on_postgres(postgres, tmp_path):
    store = open_store(tmp_path, postgres.url)
    assert isinstance(store, PgStore)
    open_store(tmp_path, postgres.url)  # a second start: the migrations are applied already
    add_job(store, "ftjob-pg-a")
    for _ in range(2):
        store.add_event("ftjob-pg-a", "Step 1/2", key="step:1", type="metrics", data={"step": 1})
    assert store.metric_steps("ftjob-pg-a") == {1}
    first = store.claim_next_job(1001)
    assert first["id"] == "ftjob-pg-a" and not first["resumed"]
    assert store.claim_next_job(1002) is None  # held under a live lease
    assert store.renew_lease("ftjob-pg-a", 1001) and not store.renew_lease("ftjob-pg-a", 1002)
    store.lease_s = -1.0  # let the lease lapse
    assert store.renew_lease("ftjob-pg-a", 1001)
    taken = store.claim_next_job(1002)
    assert taken["id"] == "ftjob-pg-a" and taken["resumed"] and taken["attempts"] == 2
    assert not store.renew_lease("ftjob-pg-a", 1001)  # the first worker learns it lost the job
    store.update_job("ftjob-pg-a", status="cancelled")


def test_postgres_and_sqlite_have_the_same_tables(postgres, tmp_path):
    import sqlite3

    from qforge.jobs.store import JobStore
    store = open_store(tmp_path / "pg", postgres.url)
    with store._connect() as db:
        rows = db.execute("SELECT table_name, column_name FROM information_schema.columns "
                          "WHERE table_schema = 'public'").fetchall()
    on_postgres = {(r[0], r[1]) for r in rows}
    lite = JobStore(tmp_path / "lite")
    with sqlite3.connect(lite.db_path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name != 'sqlite_sequence'")]
        on_sqlite = {(t, r[1]) for t in tables for r in db.execute(f"PRAGMA table_info({t})")}
    assert on_sqlite == on_postgres


def test_a_bad_database_url_is_one_line(tmp_path):
    from qforge.jobs.db import DatabaseError
    with pytest.raises(DatabaseError, match=r"cannot be brought|cannot reach") as info:
        open_store(tmp_path, "postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="--database-url must be postgresql"):
        open_store(tmp_path, "mysql://x")


def worker(url: str, storage: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qforge", "worker", "--database-url", url, "--storage",
                             str(storage), "--poll", "0.2", "--lease-seconds", "4", "--worker-threads", "1"],
                            cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_three_workers_six_jobs_one_killed(postgres, tiny_base, tmp_path):
    from tests.jobs.postgres import Postgres  # noqa: F401 - the server is the fixture's
    storage = tmp_path / "shared"
    url = postgres.url
    # a fresh database per run of this test: the jobs of the interface test stay out of the way
    import psycopg
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as db:
        db.execute("DROP DATABASE IF EXISTS scaleout")
        db.execute("CREATE DATABASE scaleout")
    url = url.rsplit("/", 1)[0] + "/scaleout"
    config = JobsConfig(data_dir=storage, base_model=str(tiny_base), start_worker=False, database_url=url)
    service = JobService(config, SimpleNamespace(base_name="tiny"))
    store = service.store
    upload = service.create_file("me", io.BytesIO(jsonl(chat_rows(8))), "train.jsonl")
    hp = dict(TINY_HP, n_epochs=2)  # 8 steps, a checkpoint after each
    body = JobBody(model="tiny", training_file=upload["id"], seed=7,
                   method={"type": "supervised", "supervised": {"hyperparameters": hp}})
    ids = [service.create_job("me", body)["id"] for _ in range(6)]
    wait_for(lambda: all(store.job_status(i) == "queued" for i in ids), 120, what="jobs to be queued")
    service.stop()

    logs = [tmp_path / f"worker-{k}.log" for k in range(3)]
    workers = [worker(url, storage, log) for log in logs]
    try:
        def mid_step():  # a job past its second checkpoint, still running: kill its worker
            for job_id in ids:
                job = store.get_job(job_id)
                if job["status"] == "running" and len(store.list_checkpoints(job_id, limit=100)[0]) >= 2:
                    return job
            return None
        victim_job = wait_for(mid_step, 300, 0.1, "a job two checkpoints in")
        victim = next(w for w in workers if w.pid == victim_job["worker_pid"])
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)

        def all_done():
            statuses = [store.job_status(i) for i in ids]
            assert "failed" not in statuses, [store.get_job(i)["error"] for i in ids]
            return all(s == "succeeded" for s in statuses)
        wait_for(all_done, 600, 0.5, "all six jobs to succeed")
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()

    adapters = [(store.job_dir(i) / "run" / "adapter" / "adapter_model.safetensors").read_bytes() for i in ids]
    assert all(a == adapters[0] for a in adapters)  # the resumed one equals the five uninterrupted ones
    taken_over = store.get_job(victim_job["id"])
    assert taken_over["attempts"] == 2
    assert any("stopped renewing its lease" in e["message"]
               for e in store.list_events(victim_job["id"], limit=1000)[0])
    assert all(store.get_job(i)["attempts"] == 1 for i in ids if i != victim_job["id"])
    for i in ids:  # no second trainer ever started beside a running one
        assert "another trainer holds" not in (store.job_dir(i) / "train.log").read_text()


def test_two_serve_replicas_on_one_database_serve_every_fine_tuned_model(postgres, tiny_base, tmp_path):
    import psycopg
    import torch

    from qforge.model.load import load_model
    from qforge.serve import AdapterRegistry
    from tests.serve.helpers import save_random_adapters

    with psycopg.connect(postgres.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as db:
        db.execute("DROP DATABASE IF EXISTS replicas")
        db.execute("CREATE DATABASE replicas")
    url = postgres.url.rsplit("/", 1)[0] + "/replicas"
    storage = tmp_path / "shared"
    store = open_store(storage, url)
    add_job(store, "ftjob-rep")
    store.claim_next_job(77)
    name = "ft:tiny::ftjob-rep"
    assert store.complete_job("ftjob-rep", name, 10, None)
    registries = []
    for _ in range(2):  # each replica: its own copy of the base, the same database and storage
        model, _ = load_model(str(tiny_base), compute_dtype=torch.float32)
        registries.append(AdapterRegistry(model, "tiny"))
    save_random_adapters(model, store.job_dir("ftjob-rep") / "run", ["adapter"], seed=5)
    services = [JobService(JobsConfig(data_dir=storage, base_model=str(tiny_base), start_worker=False,
                                      database_url=url), r).start() for r in registries]
    try:
        assert all(name in r for r in registries)
        upload = services[0].create_file("me", io.BytesIO(jsonl(chat_rows(2))), "t.jsonl")
        assert services[1].store.get_file(upload["id"], "me")["rows"] == 2  # one replica's upload, the other's view
    finally:
        for s in services:
            s.stop()
