"""Issue 19's job-service failures, each as a test: a bad database stops start-up with one line
naming it and deletes nothing; a corrupt or missing fine-tuned adapter is an error for that one
model only (listings and the other models go on); fine-tuned models are registered before the
server answers and their names cannot be taken; uploads on a full disk; a temporary folder of an
interrupted write is removed at start-up."""
import errno
import sqlite3

import httpx
import pytest
import torch

from qforge.cli import main
from qforge.jobs.api import JobsConfig, JobService, install
from qforge.jobs.db import SCHEMA_VERSION, DatabaseError
from qforge.jobs.store import JobStore, fine_tuned_model_name, now
from qforge.model.load import load_model
from qforge.serve import AdapterRegistry, Engine
from qforge import app as serve_app
from qforge.serve.api import create_app
from qforge.serve.auth import ApiKey

from tests.serve.helpers import LiveServer, save_random_adapters

from .helpers import chat_rows, jsonl

ALICE, BOB, OPERATOR = "alice-key-000", "bob-key-00000", "operator-key-0"
KEYS = [ApiKey(ALICE, "user", "alice"), ApiKey(BOB, "user", "bob"), ApiKey(OPERATOR, "operator", "ops")]


def data_dir_with_uploads(tmp_path):
    store = JobStore(tmp_path / "data")
    for i in range(3):
        store.file_path(f"file-{i}").write_text("{}\n")
        store.add_file(f"file-{i}", "me", f"{i}.jsonl", "fine-tune", 3, 1, "chat")
    return store


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    (lambda p: p.write_bytes(p.read_bytes()[:300]), "truncated"),
    (lambda p: p.write_bytes(b"garbage" * 1000), "is not a SQLite database"),
    (lambda p: p.unlink(), "is missing"),
])
def test_a_bad_database_is_one_line_naming_it_and_nothing_is_deleted(tmp_path, damage, words):
    store = data_dir_with_uploads(tmp_path)
    for suffix in ("-wal", "-shm"):
        store.db_path.with_name(store.db_path.name + suffix).unlink(missing_ok=True)
    damage(store.db_path)
    with pytest.raises(DatabaseError, match=words) as info:
        JobService(JobsConfig(data_dir=store.root, base_model="x", start_worker=False), registry=None).start()
    assert str(store.db_path) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in store.files_dir.iterdir()) == ["file-0.jsonl", "file-1.jsonl", "file-2.jsonl"]


def test_a_foreign_sqlite_database_is_refused(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-x.jsonl").write_text("{}\n")
    with sqlite3.connect(tmp_path / "qforge.db") as db:
        db.execute("CREATE TABLE customers (id INTEGER)")
        db.execute("INSERT INTO customers VALUES (1)")
    with pytest.raises(DatabaseError, match="holds other tables .*customers.*not a qforge job database"):
        JobStore(tmp_path)
    assert (tmp_path / "files" / "file-x.jsonl").exists()


def test_schema_version_is_recorded_and_an_old_database_is_migrated(tmp_path):
    store = JobStore(tmp_path / "new")
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute("PRAGMA user_version = 0")  # what the first release left
    JobStore(store.root)
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DatabaseError, match="newer than this"):
        JobStore(store.root)


def test_the_serve_command_says_so_in_one_line_before_loading_the_model(tmp_path, capsys, monkeypatch):
    store = data_dir_with_uploads(tmp_path)
    store.db_path.write_bytes(b"")
    monkeypatch.setattr(serve_app, "build_server", lambda *a: pytest.fail("must not load the model"))
    assert main(["serve", "--jobs", "--data-dir", str(store.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(store.db_path) in err and "empty" in err


def test_server_flags_are_validated(capsys):
    for flag in (["--max-batch", "0"], ["--max-queue", "-1"], ["--max-loaded-adapters", "x"], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            main(["serve", *flag])
        assert flag[0] in capsys.readouterr().err


# ---- fine-tuned models -----------------------------------------------------------------------------
def succeeded_job(store: JobStore, job_id: str, owner: str) -> str:
    store.add_job({"id": job_id, "owner": owner, "created_at": now(), "model": "tiny", "training_file": "file-x",
                   "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                   "hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}, "status": "queued"})
    store.update_job(job_id, status="running")
    name = fine_tuned_model_name("tiny", None, job_id)
    assert store.complete_job(job_id, name, 10, None)
    return name


@pytest.fixture(scope="module")
def service(tiny_base, tmp_path_factory):
    """A data dir with three succeeded jobs of alice's: a good adapter, a truncated one, a missing
    one; and an interrupted write's temporary folder."""
    model, tokenizer = load_model(str(tiny_base), compute_dtype=torch.float32)
    store = JobStore(tmp_path_factory.mktemp("jobs-data"))
    alice = KEYS[0].id
    names = {kind: succeeded_job(store, f"ftjob-{kind}", alice) for kind in ("good", "corrupt", "missing", "other")}
    for kind in ("good", "corrupt", "other"):
        save_random_adapters(model, store.job_dir(f"ftjob-{kind}") / "run", ["adapter"], seed=7)
    weights = store.job_dir("ftjob-corrupt") / "run" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    leftover = store.job_dir("ftjob-good") / "run" / "checkpoints" / ".step-000003.abc123.tmp"
    leftover.mkdir(parents=True)
    (leftover / "trainable.safetensors").write_bytes(b"half")
    registry = AdapterRegistry(model, "tiny", max_loaded=4)
    engine = Engine(model, tokenizer, registry, max_batch=4)
    jobs = JobService(JobsConfig(data_dir=store.root, base_model=str(tiny_base), start_worker=False), registry)
    app = create_app(engine, registry, api_keys=KEYS,
                     extensions=[lambda app, state, caller: install(app, state, caller, jobs)])
    jobs.start()
    registered_at_start = set(registry.names())
    with LiveServer(app) as server:
        server.names, server.registered_at_start, server.leftover = names, registered_at_start, leftover
        server.jobs = jobs
        yield server
    jobs.stop()
    engine.stop()


def chat(service, model, key=ALICE):
    return httpx.post(service.url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def test_fine_tuned_models_are_registered_before_the_server_answers(service):
    assert {service.names["good"], service.names["other"]} <= service.registered_at_start


def test_a_fine_tuned_models_name_cannot_be_taken(service):
    for key in (BOB, OPERATOR):
        r = httpx.post(service.url + "/adapters", headers={"Authorization": f"Bearer {key}"},
                       json={"name": service.names["missing"], "path": "x"})
        assert r.status_code == 403


def test_a_corrupt_or_missing_adapter_fails_only_its_own_model(service):
    r = httpx.get(service.url + "/fine_tuning/jobs", headers={"Authorization": f"Bearer {ALICE}"})
    assert r.status_code == 200 and len(r.json()["data"]) == 4
    models = [m["id"] for m in httpx.get(service.url + "/models", headers={"Authorization": f"Bearer {ALICE}"})
              .json()["data"]]
    assert service.names["good"] in models and service.names["other"] in models
    bad = chat(service, service.names["corrupt"])
    assert bad.status_code == 503
    error = bad.json()["error"]
    assert error["code"] == "model_unavailable" and "adapter_model.safetensors" in error["message"]
    assert "corrupt or truncated" in error["message"] and str(service.jobs.store.root) not in error["message"]
    gone = chat(service, service.names["missing"])
    assert gone.status_code == 503 and "does not exist" in gone.json()["error"]["message"]
    assert chat(service, service.names["good"]).status_code == 200
    assert chat(service, service.names["good"], key=BOB).status_code == 404  # still alice's only


def test_an_interrupted_writes_temporary_folder_is_removed_at_start(service):
    assert not service.leftover.exists()


def test_an_upload_on_a_full_disk_is_507(service, monkeypatch):
    import qforge.jobs.api as jobs_api

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs_api.os, "replace", full)
    r = httpx.post(service.url + "/files", headers={"Authorization": f"Bearer {ALICE}"},
                   files={"file": ("t.jsonl", jsonl(chat_rows(2)))}, data={"purpose": "fine-tune"})
    assert r.status_code == 507 and r.json()["error"]["code"] == "disk_full"
    assert [p.name for p in service.jobs.store.files_dir.iterdir() if p.name.startswith(".upload")] == []


def test_job_numbers_are_strict(service):
    files = {"file": ("t.jsonl", jsonl(chat_rows(4)))}
    upload = httpx.post(service.url + "/files", headers={"Authorization": f"Bearer {ALICE}"}, files=files,
                        data={"purpose": "fine-tune"}).json()
    for hp in ({"n_epochs": "2"}, {"batch_size": True}, {"rank": 4.5}):
        r = httpx.post(service.url + "/fine_tuning/jobs", headers={"Authorization": f"Bearer {ALICE}"},
                       json={"model": "tiny", "training_file": upload["id"],
                             "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}})
        assert r.status_code == 400, (hp, r.text)
