"""Issue 28, findings 5 and 8, on a real PostgreSQL server stopped and started again: a worker
waits out the outage while recording an outcome instead of exiting; the job a worker held when it
lost the database is its own to take up again when the database is back, even with no other worker
and the lease unexpired; the next queued job is round robin by owner; the per-key limit holds."""
import os
import threading
import time

import pytest

from qforge.jobs import worker as worker_module
from qforge.jobs.db import DatabaseError
from qforge.jobs.pg import PgStore
from qforge.jobs.store import TooManyJobs, now
from qforge.jobs.worker import Worker

from .postgres import Postgres, find_bin, missing_reason

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")


class RestartablePostgres(Postgres):
    def halt(self) -> None:
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w",
                  "-t", "60", "start")


@pytest.fixture(scope="module")
def postgres():
    server = RestartablePostgres().start()
    yield server
    server.stop()


@pytest.fixture
def store(postgres, tmp_path, monkeypatch):
    monkeypatch.setattr(worker_module, "DB_MAX_BACKOFF_S", 0.2)  # the back-off's length is not under test
    store = PgStore(postgres.url, tmp_path, lease_s=30.0)
    with store.transaction() as db:
        for table in ("events", "checkpoints", "files", "jobs"):
            db.execute(f"DELETE FROM {table}")
    return store


def add_job(store, job_id: str, owner: str = "me", max_active: int | None = None) -> None:
    store.add_job({"id": job_id, "owner": owner, "created_at": now(), "model": "tiny", "training_file": "file-x",
                   "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                   "hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}, "status": "queued"},
                  max_active=max_active)


def test_a_worker_waits_out_an_outage_while_recording_the_outcome(store, postgres):
    add_job(store, "ftjob-pg1")
    job = store.claim_next_job(os.getpid())
    worker = Worker(store, poll_s=0.05)
    postgres.halt()
    with pytest.raises(DatabaseError, match="cannot reach the job database"):
        store.job_status(job["id"])
    done = {}
    recorder = threading.Thread(target=lambda: done.setdefault("ok", worker.with_database(
        lambda: store.complete_job(job["id"], "ft:tiny::ftjob-pg1", 10, None), "recording")))
    recorder.start()
    time.sleep(1.0)  # a few failed tries (not asserted: only that it outlives them)
    assert recorder.is_alive()
    postgres.resume()
    recorder.join(120)
    assert done == {"ok": True}
    assert store.job_status(job["id"]) == "succeeded"
    messages = [e["message"] for e in store.list_events(job["id"], limit=100)[0]]
    assert messages.count("The job has successfully completed") == 1


def test_the_only_worker_takes_its_job_up_again_after_an_outage(store, postgres):
    add_job(store, "ftjob-pg2")
    pid = os.getpid()
    job = store.claim_next_job(pid)
    assert job["id"] == "ftjob-pg2" and not job["resumed"]
    postgres.halt()
    with pytest.raises(DatabaseError):
        store.renew_lease(job["id"], pid)
    postgres.resume()
    again = store.claim_next_job(pid)  # the lease has 30 s left: still this worker's own job
    assert again is not None and again["id"] == "ftjob-pg2" and again["resumed"]
    assert again["attempts"] == 2
    messages = [e["message"] for e in store.list_events(job["id"], limit=100)[0]]
    assert any("lost the job database" in m for m in messages), messages
    assert store.claim_next_job(pid + 100000) is None  # another worker waits for the lease


def test_the_next_job_is_round_robin_by_owner_on_postgres(store):
    for i in range(4):
        add_job(store, f"ftjob-a{i}", owner="alice")
    add_job(store, "ftjob-b0", owner="bob")
    add_job(store, "ftjob-c0", owner="carol")
    order = []
    while (job := store.claim_next_job(os.getpid())) is not None:
        order.append(job["owner"])
        store.update_job(job["id"], status="succeeded")
    assert order == ["alice", "bob", "carol", "alice", "alice", "alice"], order


def test_the_per_key_limit_on_postgres_holds_under_concurrent_creates(store):
    errors = []

    def create(i):
        try:
            add_job(store, f"ftjob-limit{i}", owner="eve", max_active=3)
        except TooManyJobs as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 5 and store.active_jobs("eve") == 3
