"""The model lifecycle of OpenAI's API on the jobs service (no worker: jobs are finished by hand):
checkpoint models served by their name, a fine-tuned model deleted by its owner (files gone, the job
kept), invisible to another key, and the jobs list filtered by metadata."""
import httpx
import openai
import pytest

from tests.serve.helpers import save_random_adapters

from .helpers import job_create_body
from .test_api import KEY, OTHER, client, finish_by_hand, live, other, queued, training_file  # noqa: F401

CHAT = [{"role": "user", "content": "hi"}]


def add_checkpoint_by_hand(live, job_id: str, step: int) -> None:
    """What the worker records for a checkpoint folder that holds its PEFT adapter."""
    store = live.jobs.store
    folder = store.job_dir(job_id) / "run" / "checkpoints" / f"step-{step:06d}"
    with live.registry.lock:
        save_random_adapters(live.model, folder, ["adapter"], seed=step)
    store.add_checkpoint(job_id, step, {"step": step, "train_loss": 1.0}, str(folder.relative_to(store.root)))


def test_checkpoint_models_answer_and_models_can_be_deleted(client, other, training_file, live):
    job = queued(client, client.fine_tuning.jobs.create(**job_create_body(training_file.id, "tiny"), suffix="life").id)
    for step in (1, 2):
        add_checkpoint_by_hand(live, job.id, step)
    name = finish_by_hand(live, job.id)
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    ckpt = ckpts[-1].fine_tuned_model_checkpoint
    assert ckpt == f"{name}:ckpt-step-1"
    answers = {}
    for model in (name, ckpt, f"{name}:ckpt-step-2"):
        r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.model == model
        answers[model] = r.choices[0].text
    assert len(set(answers.values())) == 3  # three different adapters
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{name}:ckpt-step-9", prompt="Hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=ckpt, prompt="Hello", max_tokens=2)

    for model in (name, ckpt):  # someone else cannot delete them: for them they do not exist
        with pytest.raises(openai.NotFoundError):
            other.models.delete(model)
    deleted = client.models.delete(ckpt)
    assert deleted.deleted and deleted.id == ckpt
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=ckpt, prompt="Hello", max_tokens=2)
    assert client.completions.create(model=f"{name}:ckpt-step-2", prompt="Hello", max_tokens=2).model
    assert client.models.delete(name).deleted
    assert not (live.jobs.store.job_dir(job.id) / "run" / "adapter").exists()
    assert name not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=CHAT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)  # already gone
    kept = client.fine_tuning.jobs.retrieve(job.id)
    assert kept.status == "succeeded" and kept.fine_tuned_model == name  # the job stays, as OpenAI's does
    r = httpx.delete(live.url + "/models/tiny", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_deletable"


def test_jobs_list_filters_by_metadata(client, other, training_file):
    a = client.fine_tuning.jobs.create(**job_create_body(training_file.id, "tiny"), metadata={"team": "x", "run": "1"})
    b = client.fine_tuning.jobs.create(**job_create_body(training_file.id, "tiny"), metadata={"team": "x", "run": "2"})
    c = client.fine_tuning.jobs.create(**job_create_body(training_file.id, "tiny"), metadata={"team": "y"})
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "x"})] == [b.id, a.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "x", "run": "1"})] == [a.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "y"})] == [c.id]
    page = client.fine_tuning.jobs.list(metadata={"team": "x"}, limit=1)
    assert [j.id for j in page.data] == [b.id] and page.has_more
    assert list(other.fine_tuning.jobs.list(metadata={"team": "x"})) == []
    assert {a.id, b.id, c.id} <= {j.id for j in client.fine_tuning.jobs.list(limit=100)}
