"""A fine-tuned model deleted while the jobs service's model watcher registers it answers 404, in
whichever order the two threads run.

The interleaving that gave a 503 (a loaded full-suite run, tests/serve/test_dedicated.py): DELETE
/v1/models/{name} holds the service's register lock, has unloaded the model (so it is no longer in
the registry) but not yet removed its folder; the watcher's register() finds the name unregistered
and the folder whole, without the lock, then waits for it; the delete removes the folder, marks the
name deleted and lets go; register() then adds a folder that no longer holds a model, records the
name as unloadable, and every later request for it got 503 model_unavailable. Here the delete's
file removal starts the watcher's register() and waits until it reaches the lock (an event, no
sleep), which forces exactly that order. Also: a dedicated model's background load that fails
because the model was removed meanwhile leaves no stale error behind."""
import threading

import httpx
import pytest
import torch

from qforge.jobs import models as ft_models
from qforge.jobs.api import JobsConfig, JobService, install
from qforge.jobs.store import JobStore, fine_tuned_model_name, now
from qforge.model.load import load_model
from qforge.serve import AdapterRegistry, Engine
from qforge.serve.api import create_app
from qforge.serve.dedicated import DedicatedModels, RoutingEngine

from tests.fixtures import tiny_model_folder
from tests.serve.helpers import LiveServer, save_random_adapters

OWNER = "anonymous"  # the caller's id on a server without keys


class WatchedLock:
    """The service's register lock, saying when thread `watch` has come to it (before it waits)."""

    def __init__(self):
        self._lock, self.reached, self.watch = threading.Lock(), threading.Event(), None

    def __enter__(self):
        if threading.current_thread() is self.watch:
            self.reached.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


def succeeded_job(store: JobStore, job_id: str) -> dict:
    store.add_job({"id": job_id, "owner": OWNER, "created_at": now(), "model": "tiny", "training_file": "file-x",
                   "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                   "hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}, "status": "queued"})
    store.update_job(job_id, status="running")
    assert store.complete_job(job_id, fine_tuned_model_name("tiny", None, job_id), 10, None)
    return store.get_job(job_id, OWNER)


@pytest.fixture
def service(tiny_base, tmp_path):
    """A server without keys over the tiny base, with dedicated models and the jobs service (no
    worker, no watcher thread: the test plays the watcher) and two succeeded jobs: a full fine-tune
    (run/model, a whole model folder) and a LoRA one (run/adapter)."""
    model, tokenizer = load_model(str(tiny_base), compute_dtype=torch.float32)
    store = JobStore(tmp_path / "data")
    full, lora = succeeded_job(store, "ftjob-full"), succeeded_job(store, "ftjob-lora")
    tiny_model_folder(store.job_dir(full["id"]) / "run" / "model")
    save_random_adapters(model, store.job_dir(lora["id"]) / "run", ["adapter"], seed=7)
    registry = AdapterRegistry(model, "tiny", max_loaded=4)
    registry.dedicated = DedicatedModels(torch.float32, torch.device("cpu"), max_models=1)
    base = Engine(model, tokenizer, registry, max_batch=4)
    jobs = JobService(JobsConfig(data_dir=store.root, base_model=str(tiny_base), start_worker=False), registry)
    jobs._register_lock = WatchedLock()
    app = create_app(RoutingEngine(base, registry.dedicated), registry,
                     extensions=[lambda app, state, caller: install(app, state, caller, jobs)])
    with LiveServer(app) as server:
        server.jobs, server.registry, server.by_kind = jobs, registry, {"full": full, "lora": lora}
        yield server
    jobs.stop()
    registry.dedicated.stop()
    base.stop()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_model_deleted_while_the_watcher_registers_it_is_404(service, kind, monkeypatch):
    jobs, registry, job = service.jobs, service.registry, service.by_kind[kind]
    name = job["fine_tuned_model"]
    jobs.register(job)  # served, as after the watcher's first pass
    assert name in registry
    if kind == "full":
        registry.dedicated.wait_loaded(name, timeout=120)  # its background load done: only the two threads race
    remove_files, watcher = ft_models.delete_adapter_files, threading.Thread(target=lambda: watch(jobs, job))

    def delete_while_the_watcher_registers(folder):
        assert name not in registry  # unloaded, its files still there: the watcher's register() goes on
        jobs._register_lock.watch = watcher
        watcher.start()
        jobs._register_lock.reached.wait()  # register() is at the lock (or done), the delete holds it
        return remove_files(folder)

    monkeypatch.setattr(ft_models, "delete_adapter_files", delete_while_the_watcher_registers)
    with httpx.Client(base_url=service.url, timeout=60) as http:
        deleted = http.delete(f"/models/{name}")
        watcher.join()
        after = http.post("/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1})
        listed = [m["id"] for m in http.get("/models").json()["data"]]
    assert deleted.status_code == 200 and deleted.json()["deleted"], deleted.text
    assert after.status_code == 404, after.text
    assert after.json()["error"]["code"] == "model_not_found"
    assert name not in registry and name not in registry.dedicated and name not in listed
    assert jobs.model_error(name) is None


def watch(jobs: JobService, job: dict) -> None:
    """The watcher's register() of `job`; the lock hears of it even when register() returns first."""
    try:
        jobs.register(job)
    finally:
        jobs._register_lock.reached.set()


def test_a_dedicated_load_that_fails_after_its_model_was_removed_leaves_no_error(tmp_path):
    """DedicatedModels: a background load that fails because its model was removed meanwhile (its
    folder gone) records nothing, so the name, served again later, loads afresh rather than answer
    the old failure."""
    models, started, go = DedicatedModels(torch.float32, torch.device("cpu")), threading.Event(), threading.Event()

    def load_that_fails(name):
        started.set()
        go.wait()
        raise FileNotFoundError("its folder went while it loaded")

    models._load = load_that_fails
    (tmp_path / "config.json").write_text("{}")  # all add() reads; the load is the stand-in above
    models.add("m", tmp_path)  # its load starts in the background
    started.wait()
    loading = models._loading["m"]
    models.remove("m")
    go.set()
    loading.join()
    assert "m" not in models and "m" not in models._errors and "m" not in models._loading


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_deleted_model_stays_deleted_after_a_restart(service, kind):
    """The deletion is in the job's events before the files go: a server started later over the same
    data does not take the missing folder for a broken model (503) - it is simply gone (404)."""
    jobs, registry, job = service.jobs, service.registry, service.by_kind[kind]
    name = job["fine_tuned_model"]
    with httpx.Client(base_url=service.url, timeout=60) as http:
        assert http.delete(f"/models/{name}").status_code == 200
    restarted = JobService(JobsConfig(data_dir=jobs.store.root, base_model="tiny", start_worker=False), registry)
    try:
        restarted.start()  # registers every succeeded job's model, as at start-up
        assert restarted.model_visible(name, OWNER)  # its owner's: a request would try to register it
        assert name not in registry and restarted.model_error(name) is None  # so resolve_model says 404
        assert "was deleted" in restarted.store.list_events(job["id"])[0][0]["message"]
    finally:
        restarted.stop()
