"""qforge.jobs.store: keyed events and checkpoints are written once, claims are atomic across
processes, pages run newest first, orphans of an interrupted upload are swept."""
import os
import subprocess
import sys

from qforge.jobs.store import JobStore, fine_tuned_model_name, now


def add_job(store: JobStore, job_id: str, owner: str = "me", status: str = "queued") -> dict:
    return store.add_job({"id": job_id, "owner": owner, "created_at": now(), "model": "tiny", "training_file": "file-x",
                          "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                          "hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}, "status": status})


def test_a_keyed_event_is_stored_once(tmp_path):
    store = JobStore(tmp_path)
    add_job(store, "ftjob-a")
    for _ in range(3):  # a step replayed after a crash reports itself again
        store.add_event("ftjob-a", "Step 1/2", key="step:1", type="metrics", data={"step": 1, "train_loss": 2.0})
        store.add_event("ftjob-a", "resumed")  # unkeyed messages are history: each one stays
    events, more = store.list_events("ftjob-a", limit=100)
    assert [e["message"] for e in events].count("Step 1/2") == 1 and not more
    assert [e["message"] for e in events].count("resumed") == 3
    assert store.metric_steps("ftjob-a") == {1}


def test_a_checkpoint_is_recorded_once_per_step(tmp_path):
    store = JobStore(tmp_path)
    add_job(store, "ftjob-a")
    assert store.add_checkpoint("ftjob-a", 2, {"step": 2}, "jobs/ftjob-a/run/checkpoints/step-000002")
    assert not store.add_checkpoint("ftjob-a", 2, {"step": 2}, "jobs/ftjob-a/run/checkpoints/step-000002")
    rows, _ = store.list_checkpoints("ftjob-a")
    assert [r["step"] for r in rows] == [2]
    assert [e["message"] for e in store.list_events("ftjob-a")[0]] == ["Checkpoint created at step 2"]


def test_claims_are_atomic_across_processes(tmp_path):
    store = JobStore(tmp_path)
    ids = [f"ftjob-{i:03d}" for i in range(30)]
    for job_id in ids:
        add_job(store, job_id)
    script = ("import os, sys; from qforge.jobs.store import JobStore\n"
              "s = JobStore(sys.argv[1])\n"
              "while (job := s.claim_next_job(os.getpid())) is not None:\n"
              "    s.update_job(job['id'], status='succeeded'); print(job['id'], flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    claimed = [line for p in procs for line in p.communicate(timeout=120)[0].split()]
    assert sorted(claimed) == ids  # every job exactly once
    assert {store.get_job(i)["attempts"] for i in ids} == {1}


def test_a_job_left_running_is_claimed_before_queued_ones(tmp_path):
    store = JobStore(tmp_path)
    add_job(store, "ftjob-old")
    add_job(store, "ftjob-new")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "qforge.jobs.worker"])
    try:
        first = store.claim_next_job(live.pid)
        assert first["id"] == "ftjob-old" and not first["resumed"]
        assert store.claim_next_job(os.getpid())["id"] == "ftjob-new"  # a live worker's job is left alone
        store.update_job("ftjob-new", status="succeeded")
        assert store.claim_next_job(os.getpid()) is None
    finally:
        live.kill()
        live.wait()
    again = store.claim_next_job(os.getpid())  # its worker died: the job is resumed
    assert again["id"] == "ftjob-old" and again["resumed"] and again["attempts"] == 2
    assert again["worker_pid"] == os.getpid()


def test_pages_run_newest_first(tmp_path):
    store = JobStore(tmp_path)
    for i in range(5):
        add_job(store, f"ftjob-{i}")
    page, more = store.list_jobs("me", limit=2)
    assert [j["id"] for j in page] == ["ftjob-4", "ftjob-3"] and more
    page, more = store.list_jobs("me", after="ftjob-3", limit=10)
    assert [j["id"] for j in page] == ["ftjob-2", "ftjob-1", "ftjob-0"] and not more
    assert store.list_jobs("someone else")[0] == []


def test_orphans_of_an_interrupted_upload_or_delete_are_swept(tmp_path):
    store = JobStore(tmp_path)
    kept = store.add_file("file-kept", "me", "a.jsonl", "fine-tune", 3, 1, "chat")
    store.file_path(kept["id"]).write_text("{}\n")
    (store.files_dir / ".upload-file-half.jsonl").write_text("{")
    (store.files_dir / "file-norow.jsonl").write_text("{}\n")
    assert sorted(store.sweep_orphan_files()) == [".upload-file-half.jsonl", "file-norow.jsonl"]
    assert [p.name for p in store.files_dir.iterdir()] == ["file-kept.jsonl"]


def test_fine_tuned_model_names_are_valid_adapter_names():
    from qforge.serve.registry import NAME_PATTERN
    name = fine_tuned_model_name("Llama-3.1-8B.Instruct", "my_suffix", "ftjob-0123456789abcdef01234567")
    assert name == "ft:Llama-3-1-8B-Instruct:my_suffix:ftjob-0123456789abcdef01234567"
    assert NAME_PATTERN.match(name) and NAME_PATTERN.match(fine_tuned_model_name("smollm2", None, "ftjob-x"))


def test_an_orphan_younger_than_the_grace_is_kept(tmp_path):
    store = JobStore(tmp_path)
    store.orphan_grace_s = 3600.0  # as PostgreSQL's store: another replica may be recording it
    (store.files_dir / "file-fresh.jsonl").write_text("{}\n")
    old = store.files_dir / "file-old.jsonl"
    old.write_text("{}\n")
    os.utime(old, (now() - 7200, now() - 7200))
    assert store.sweep_orphan_files() == ["file-old.jsonl"]


# ---- the schema: one source, the Alembic migrations ------------------------------------------------
def test_the_head_revision_is_alembics():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from qforge.jobs.db import HEAD_REVISION, MIGRATIONS_DIR
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION


def test_the_sqlite_tables_come_from_the_migrations(tmp_path):
    import sqlite3
    store = JobStore(tmp_path)
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        jobs = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    assert {"seq", "id", "status", "lease_owner", "lease_expires", "attempts"} <= jobs
    for job_id in ("ftjob-a", "ftjob-b"):  # seq is AUTOINCREMENT: the pages keep their order
        add_job(store, job_id)
    assert [j["id"] for j in store.list_jobs("me")[0]] == ["ftjob-b", "ftjob-a"]


LEGACY_SCHEMA = """
CREATE TABLE files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, rows INTEGER,
    format TEXT);
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL,
    created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER, model TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL, metadata TEXT,
    hyperparameters TEXT NOT NULL, method TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
    fine_tuned_model TEXT UNIQUE, trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]', total_steps INTEGER,
    estimated_finish INTEGER, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER, train_pid INTEGER);
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT, key TEXT,
    UNIQUE (job_id, key));
CREATE TABLE checkpoints (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    step INTEGER NOT NULL, created_at INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL,
    UNIQUE (job_id, step));
PRAGMA user_version = 1;
"""


def test_a_database_made_before_the_migrations_is_adopted(tmp_path):
    import sqlite3
    with sqlite3.connect(tmp_path / "qforge.db") as db:
        db.executescript(LEGACY_SCHEMA)
        db.execute("INSERT INTO files (id, owner, filename, purpose, bytes, created_at) "
                   "VALUES ('file-a', 'me', 'a.jsonl', 'fine-tune', 3, 1)")
    store = JobStore(tmp_path)
    assert store.get_file("file-a", "me")["bytes"] == 3
    add_job(store, "ftjob-a")
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        assert "lease_owner" in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
