"""Issue 28, findings 5 and 8, on the SQLite store with injected failures: a worker waits out a
job database that is down (while recording an outcome, and inside its failure handler) instead of
exiting; a result the trainer left on the storage is recorded, not trained again; metric events
are recorded exactly once across an outage; the next job claimed is round robin by owner. No
training runs: the trainer's attempt is replaced by one that writes its result."""
import json
import os

import pytest

from qforge.jobs import worker as worker_module
from qforge.jobs.db import DatabaseError
from qforge.jobs.store import JobStore
from qforge.jobs.worker import Progress, Worker


def add_job(store: JobStore, job_id: str, owner: str = "alice", status: str = "queued") -> None:
    store.add_job({"id": job_id, "owner": owner, "created_at": 1, "model": "tiny", "training_file": "f",
                   "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                   "hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}, "status": status})


class Outage:
    """Make `store.<method>` raise DatabaseError for its next `times` calls."""

    def __init__(self, store, monkeypatch, method: str, times: int):
        self.left, self.calls, original = times, 0, getattr(store, method)

        def flaky(*args, **kwargs):
            self.calls += 1
            if self.left > 0:
                self.left -= 1
                raise DatabaseError("cannot reach the job database 'postgresql://db': connection refused")
            return original(*args, **kwargs)

        monkeypatch.setattr(store, method, flaky)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_module, "DB_MAX_BACKOFF_S", 0.01)  # the back-off's length is not under test
    return JobStore(tmp_path / "data")


def write_result(store: JobStore, job_id: str, status: str = "succeeded") -> None:
    job_dir = store.job_dir(job_id)
    (job_dir / "run").mkdir(parents=True, exist_ok=True)
    (job_dir / "result.json").write_text(json.dumps({"status": status, "summary": {"tokens": 12}}))


def worker_until(store: JobStore, done, trained: list, **kw) -> Worker:
    """A worker whose attempts write a succeeded result, stopping once done() holds."""
    worker = Worker(store, poll_s=0.01, **kw)

    def attempt(job, job_dir):
        trained.append(job["id"])
        write_result(store, job["id"])
        return 0

    worker.attempt = attempt
    worker.should_stop = lambda: worker.stopping or done()
    return worker


def test_an_outage_while_recording_the_outcome_is_waited_out(store, monkeypatch):
    add_job(store, "ftjob-a")
    outage = Outage(store, monkeypatch, "complete_job", 3)
    trained: list = []
    worker_until(store, lambda: store.job_status("ftjob-a") == "succeeded", trained).run()
    assert store.job_status("ftjob-a") == "succeeded"
    assert outage.calls == 4 and trained == ["ftjob-a"]  # trained once; recording tried until it worked
    messages = [e["message"] for e in store.list_events("ftjob-a", limit=100)[0]]
    assert messages.count("The job has successfully completed") == 1


def test_the_failure_handler_waits_out_an_outage_and_the_worker_goes_on(store, monkeypatch):
    add_job(store, "ftjob-bug")
    add_job(store, "ftjob-next")

    def run_job(job):
        if job["id"] == "ftjob-bug":
            raise KeyError("a bug in the bookkeeping")
        original(job)

    trained: list = []
    worker = worker_until(store, lambda: store.job_status("ftjob-next") == "succeeded", trained)
    original = worker.run_job
    worker.run_job = run_job
    Outage(store, monkeypatch, "update_job", 2)  # the failure handler's first two tries
    worker.run()  # does not raise: the worker stays up
    bug = store.get_job("ftjob-bug")
    assert bug["status"] == "failed" and bug["error"]["code"] == "internal_error"
    assert store.job_status("ftjob-next") == "succeeded"


def test_a_job_interrupted_by_an_outage_stays_running_and_is_claimed_again(store, monkeypatch):
    add_job(store, "ftjob-c")
    calls = {"n": 0}
    trained: list = []
    worker = worker_until(store, lambda: store.job_status("ftjob-c") == "succeeded", trained)
    original = worker.finish

    def finish(job, returncode, job_dir):  # a database error outside with_database's retries
        calls["n"] += 1
        if calls["n"] == 1:
            raise DatabaseError("cannot reach the job database 'postgresql://db': the server closed the connection")
        return original(job, returncode, job_dir)

    monkeypatch.setattr(worker, "with_database", lambda call, what: call())
    worker.finish = finish
    worker.run()
    assert store.job_status("ftjob-c") == "succeeded"
    assert trained == ["ftjob-c"]  # claimed again: the result on the storage is recorded, not trained again
    assert store.get_job("ftjob-c")["attempts"] == 2


def test_a_result_left_by_a_dead_worker_is_recorded_without_training_again(store):
    add_job(store, "ftjob-d")
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    store.update_job("ftjob-d", status="running", worker_pid=gone)
    write_result(store, "ftjob-d")
    trained: list = []
    worker_until(store, lambda: store.job_status("ftjob-d") == "succeeded", trained).run()
    assert store.job_status("ftjob-d") == "succeeded" and trained == []


def test_metric_events_are_recorded_exactly_once_across_an_outage(store, monkeypatch):
    add_job(store, "ftjob-m", status="running")
    run = store.job_dir("ftjob-m") / "run"
    run.mkdir(parents=True)
    metrics = run / "metrics.jsonl"

    def append(steps):
        with open(metrics, "a") as fh:
            for s in steps:
                fh.write(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "tokens": 10 * s}) + "\n")

    progress = Progress(store, store.get_job("ftjob-m"))
    append(range(1, 6))
    progress.sync()
    append(range(6, 33))  # steps 6-32 written while the database is down
    outage = Outage(store, monkeypatch, "add_events", 3)
    for _ in range(3):
        with pytest.raises(DatabaseError):
            progress.sync()
    append(range(33, 36))
    progress.sync()  # the database is back
    progress.sync()

    def steps():
        return sorted(e["data"]["step"] for e in store.list_events("ftjob-m", limit=1000)[0] if e["type"] == "metrics")

    assert steps() == list(range(1, 36)) and outage.left == 0
    follower = Progress(store, store.get_job("ftjob-m"))  # a new worker's follower reads the file from the start
    follower.steps_seen = set()  # even one that does not know what is stored adds nothing twice
    follower.sync()
    assert steps() == list(range(1, 36))


def claim_order(store: JobStore) -> list[str]:
    order = []
    while (job := store.claim_next_job(os.getpid())) is not None:
        order.append(job["owner"])
        store.update_job(job["id"], status="succeeded")
    return order


def test_the_next_job_is_round_robin_by_owner(store):
    for i in range(6):
        add_job(store, f"ftjob-a{i}", owner="alice")
    add_job(store, "ftjob-b0", owner="bob")
    add_job(store, "ftjob-b1", owner="bob")
    add_job(store, "ftjob-c0", owner="carol")
    order = claim_order(store)
    assert order[:6] == ["alice", "bob", "carol", "alice", "bob", "alice"], order
    assert order.count("alice") == 6 and len(order) == 9


def test_a_new_owners_job_goes_before_a_busy_owners_backlog(store):
    for i in range(20):
        add_job(store, f"ftjob-a{i}", owner="alice")
    first = store.claim_next_job(os.getpid())
    store.update_job(first["id"], status="succeeded")
    add_job(store, "ftjob-late", owner="bob")  # created after alice's 20
    assert store.claim_next_job(os.getpid())["id"] == "ftjob-late"


def test_the_per_key_limit_is_counted_in_the_insert(store):
    from qforge.jobs.store import TooManyJobs
    for i in range(2):
        store.add_job({"id": f"ftjob-l{i}", "owner": "dan", "created_at": 1, "model": "tiny", "training_file": "f",
                       "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                       "hyperparameters": {}, "method": {"type": "supervised"}, "status": "queued"}, max_active=2)
    with pytest.raises(TooManyJobs, match="the limit is 2"):
        add_job_limited = {"id": "ftjob-l2", "owner": "dan", "created_at": 1, "model": "tiny", "training_file": "f",
                           "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                           "hyperparameters": {}, "method": {"type": "supervised"}, "status": "queued"}
        store.add_job(add_job_limited, max_active=2)
    assert store.get_job("ftjob-l2") is None
    store.update_job("ftjob-l0", status="failed")
    store.add_job(add_job_limited, max_active=2)


def test_the_last_progress_is_recorded_when_the_database_is_down_as_the_trainer_exits(store, monkeypatch):
    """Found by the soak: a trainer that ended during an outage had its last steps' events dropped."""
    add_job(store, "ftjob-last", status="running")
    run = store.job_dir("ftjob-last") / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5, "lr": 1e-4, "tokens": 8}) + "\n"
                                               for s in range(1, 5)))
    outage = Outage(store, monkeypatch, "add_events", 3)

    class Exited:
        pid, returncode = 0, 0

        def poll(self):
            return 0

    Worker(store, poll_s=0.01).follow(store.get_job("ftjob-last"), Exited())
    steps = sorted(e["data"]["step"] for e in store.list_events("ftjob-last", limit=100)[0] if e["type"] == "metrics")
    assert steps == [1, 2, 3, 4] and outage.left == 0


def test_a_trainer_that_dies_on_a_full_disk_waits_for_room_instead_of_counting_a_crash(store, monkeypatch):
    """Found by the soak: with the disk full a trainer cannot write its log or result and exits 1;
    three such exits during one fill failed the job as 'training_crashed'."""
    from qforge import fileio
    add_job(store, "ftjob-full", status="running")
    store.job_dir("ftjob-full").mkdir(parents=True)
    worker, job = Worker(store, poll_s=0.01), store.get_job("ftjob-full")
    monkeypatch.setattr(fileio, "free_bytes", lambda path: 0)
    why = worker.finish(job, 1, store.job_dir("ftjob-full"))
    assert why is not None and "no room left" in why
    assert store.get_job("ftjob-full")["crashes"] == 0 and store.job_status("ftjob-full") == "running"
    monkeypatch.setattr(fileio, "free_bytes", lambda path: 10 * 2 ** 30)
    assert worker.finish(job, 1, store.job_dir("ftjob-full")) is None  # with room it is a crash
    assert store.get_job("ftjob-full")["crashes"] == 1
