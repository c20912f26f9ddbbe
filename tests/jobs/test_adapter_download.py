"""GET /v1/fine_tuning/jobs/{id}/adapter: a succeeded job's adapter folder as a zip, byte for byte, to
its owner; 404 to any other key (the job does not exist for it), 409 before the job has succeeded.
No training: the job is made to succeed in the store with a random PEFT adapter in its run folder,
as the worker leaves it. make_finished_job is shared with the dashboard's browser test."""
import io
import zipfile

import httpx
import openai
import pytest
import torch

from qforge.jobs.store import fine_tuned_model_name
from qforge.jobs.worker import metric_event

from tests.serve.helpers import save_random_adapters

from .helpers import InProcessService, chat_rows, jsonl, wait_for

KEY, OTHER = "download-key", "other-key"


def queued_job(client, file_id: str, **hyperparameters) -> str:
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, suffix="friends",
                                         hyperparameters=hyperparameters or None)
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "queued", 30, what="queued")
    return job.id


def add_steps(store, job_id: str, steps, total: int) -> None:
    """Metric events as the worker writes them from metrics.jsonl (a validation loss every 2 steps)."""
    store.add_events(job_id, [metric_event({"step": s, "loss": 2.5 - 0.3 * s, "lr": 2e-4 * s / total,
                                            "tokens": 40 * s, **({"eval_loss": 2.6 - 0.3 * s} if s % 2 == 0 else {})},
                                           total) for s in steps])


def make_finished_job(service, client, tiny_base, file_id: str) -> tuple[str, str]:
    """(job id, model name) of a job that succeeded after 3 steps, with a checkpoint at step 1."""
    from qforge.model.load import load_model

    job_id = queued_job(client, file_id, rank=4, max_seq_len=64, max_steps=3)
    store = service.jobs.store
    store.update_job(job_id, status="running")
    add_steps(store, job_id, (1, 2, 3), 3)
    model, _ = load_model(str(tiny_base), compute_dtype=torch.float32)
    run = store.job_dir(job_id) / "run"
    save_random_adapters(model, run, ["adapter"])
    save_random_adapters(model, run / "checkpoints" / "step-1", ["adapter"], seed=7)
    store.add_checkpoint(job_id, 1, {"step": 1, "train_loss": 2.2},
                         str((run / "checkpoints" / "step-1").relative_to(store.root)))
    name = fine_tuned_model_name("tiny", "friends", job_id)
    assert store.complete_job(job_id, name, 120, None)
    return job_id, name


@pytest.fixture(scope="module")
def service(tiny_base, tmp_path_factory):
    with InProcessService(tiny_base, tmp_path_factory.mktemp("download"), keys=[KEY, OTHER],
                          start_worker=False) as live:
        yield live


@pytest.mark.slow  # a minute on a busy 2-core machine (the server, a model, two adapters)
def test_the_owner_downloads_the_adapter_and_no_one_else(service, tiny_base):
    client = openai.OpenAI(base_url=service.url, api_key=KEY, max_retries=0, timeout=60)
    data = client.files.create(file=("chat.jsonl", jsonl(chat_rows(6))), purpose="fine-tune")
    job_id, name = make_finished_job(service, client, tiny_base, data.id)
    url = f"{service.url}/fine_tuning/jobs/{job_id}/adapter"

    answer = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert name.replace(":", "_") + "-adapter.zip" in answer.headers["content-disposition"]
    folder = service.jobs.store.job_dir(job_id) / "run" / "adapter"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        names = archive.namelist()
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names)
        for member in names:  # the files the server loads, byte for byte
            assert archive.read(member) == (folder / member).read_bytes(), member

    other = httpx.get(url, headers={"Authorization": f"Bearer {OTHER}"}, timeout=60)
    assert other.status_code == 404 and job_id in other.json()["error"]["message"]
    assert httpx.get(url, timeout=60).status_code == 401

    waiting = queued_job(client, data.id)
    early = httpx.get(f"{service.url}/fine_tuning/jobs/{waiting}/adapter",
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert early.status_code == 409 and early.json()["error"]["code"] == "adapter_not_ready"
