"""The worker for real: `qforge serve --jobs`'s build path in this process (the worker and trainers
are subprocesses) training the tiny model. Jobs run one at a time in order and a failure does not stop
the queue; cancel stops a running job within seconds and keeps its checkpoints; kill -9 of the worker
mid-job resumes the job from its last checkpoint, with no event, checkpoint or step lost or doubled."""
import collections
import os
import signal
import time

import openai
import pytest

from qforge.jobs.store import pid_alive

from .helpers import InProcessService, chat_rows, job_create_body, jsonl, wait_for

FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def service(tiny_base, tmp_path_factory):
    with InProcessService(tiny_base, tmp_path_factory.mktemp("jobs-data")) as svc:
        svc.client = openai.OpenAI(base_url=svc.url, api_key="none", max_retries=0, timeout=60)
        svc.store = svc.jobs.store
        yield svc


@pytest.fixture(scope="module")
def training_file(service):
    return service.client.files.create(file=("train.jsonl", jsonl(chat_rows(8))), purpose="fine-tune")


def create(service, file_id, suffix=None, **hp):
    return service.client.fine_tuning.jobs.create(**job_create_body(file_id, "tiny", **hp), suffix=suffix)


def finished(service, job_id, timeout=240):
    return wait_for(lambda: (j := service.client.fine_tuning.jobs.retrieve(job_id)).status in FINISHED and j,
                    timeout, 0.5, f"job {job_id} to finish")


def all_events(service, job_id):
    return list(service.client.fine_tuning.jobs.list_events(job_id, limit=1000))[::-1]


def checkpoints_at_least(service, job_id, n):
    return len(service.client.fine_tuning.jobs.checkpoints.list(job_id, limit=100).data) >= n


def assert_each_step_once(service, job_id, steps):
    events = all_events(service, job_id)
    metric_steps = collections.Counter(e.data["step"] for e in events if e.type == "metrics")
    assert metric_steps == collections.Counter(range(1, steps + 1))
    checkpoint_steps = [c.step_number for c in service.client.fine_tuning.jobs.checkpoints.list(job_id, limit=100)]
    assert sorted(checkpoint_steps) == list(range(1, steps + 1))
    per_attempt = ("Resuming", "model", "data", "resumed", "The training", "gradient checkpointing")  # said by each start
    keyed = [e.message for e in events if e.type == "message" and not e.message.startswith(per_attempt)]
    assert len(keyed) == len(set(keyed)), keyed


def test_jobs_run_one_at_a_time_in_order_and_a_failure_does_not_stop_the_queue(service, training_file):
    good1 = create(service, training_file.id, max_steps=2)
    bad = create(service, training_file.id, max_steps=2, max_seq_len=8)  # every assistant token cut off
    good2 = create(service, training_file.id, max_steps=2)
    jobs = [finished(service, j.id) for j in (good1, bad, good2)]
    assert [j.status for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert jobs[1].error.code == "invalid_training_file" and "no row has a trainable token" in jobs[1].error.message
    assert jobs[1].fine_tuned_model is None and "/" not in jobs[1].error.message.split(":")[0]
    rows = [service.store.get_job(j.id) for j in jobs]
    assert rows[0]["finished_at"] <= rows[1]["started_at"] and rows[1]["finished_at"] <= rows[2]["started_at"]
    assert jobs[0].fine_tuned_model == f"ft:tiny::{good1.id}" and jobs[0].trained_tokens > 0
    csv = service.client.files.content(jobs[0].result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == 3
    assert_each_step_once(service, good1.id, 2)
    from tests.train.test_run_checks import read_scalars  # the job's TensorBoard events, as train writes them
    scalars, _ = read_scalars(service.store.job_dir(good1.id) / "run" / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        service.client.fine_tuning.jobs.cancel(good1.id)


def test_cancel_stops_a_running_job_within_seconds_and_keeps_its_checkpoints(service, training_file):
    job = create(service, training_file.id, max_steps=500)
    wait_for(lambda: checkpoints_at_least(service, job.id, 2), 180, 0.5, "two checkpoints")
    trainer = service.store.get_job(job.id)["train_pid"]
    assert pid_alive(trainer)
    start = time.monotonic()
    assert service.client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    wait_for(lambda: not pid_alive(trainer), 30, 0.1, "the trainer to stop")
    stopped_after = time.monotonic() - start
    assert stopped_after < 20, stopped_after
    wait_for(lambda: any("checkpoint(s) are kept" in e.message for e in all_events(service, job.id)), 10)
    job = service.client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    run = service.store.job_dir(job.id) / "run"
    listed = sorted(c.step_number for c in service.client.fine_tuning.jobs.checkpoints.list(job.id, limit=100))
    on_disk = sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))
    assert listed == on_disk and len(on_disk) >= 2 and not (run / "adapter").exists()
    # SIGINT made the loop save the step it was on: the last checkpoint is the last step trained
    steps = [e.data["step"] for e in all_events(service, job.id) if e.type == "metrics"]
    assert on_disk[-1] == max(steps)


def test_kill_9_of_the_worker_mid_job_resumes_from_the_last_checkpoint(service, training_file):
    steps = 8
    job = create(service, training_file.id, max_steps=steps, suffix="survivor")
    wait_for(lambda: checkpoints_at_least(service, job.id, 2), 180, 0.2, "two checkpoints")
    worker, trainer = service.jobs.supervisor.pid, service.store.get_job(job.id)["train_pid"]
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not pid_alive(trainer), 15, 0.1, "the trainer to die with its worker")
    wait_for(lambda: service.jobs.supervisor.pid not in (None, worker), 30, 0.1, "a new worker")
    job = finished(service, job.id)
    assert job.status == "succeeded" and job.fine_tuned_model == f"ft:tiny:survivor:{job.id}"
    row = service.store.get_job(job.id)
    assert row["attempts"] == 2 and row["crashes"] == 0
    events = all_events(service, job.id)
    assert any(e.message.startswith("Resuming the job from its last checkpoint") for e in events)
    assert any(e.message.startswith("resumed from run/checkpoints/step-") for e in events)
    assert_each_step_once(service, job.id, steps)
    reply = service.client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                                   messages=[{"role": "user", "content": "Who is Ada?"}])
    assert reply.model == job.fine_tuned_model


def test_a_real_jobs_checkpoints_are_models_and_the_model_can_be_deleted(service, training_file):
    """Every checkpoint writes its PEFT adapter: ckpt-step-N answers, and the last checkpoint answers
    as the job's final model (the same weights); deleting the model leaves the checkpoints."""
    job = finished(service, create(service, training_file.id, suffix="ckpt", max_steps=2).id)
    assert job.status == "succeeded"
    names = [c.fine_tuned_model_checkpoint for c in service.client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert names == [f"{job.fine_tuned_model}:ckpt-step-2", f"{job.fine_tuned_model}:ckpt-step-1"]
    ask = dict(prompt="Who is Ada?", max_tokens=6, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    final = service.client.completions.create(model=job.fine_tuned_model, **ask).choices[0]
    last = service.client.completions.create(model=names[0], **ask).choices[0]
    first = service.client.completions.create(model=names[1], **ask)
    # the same weights; this server's float32 answers vary in the last bits from run to run (~1e-5)
    assert last.logprobs.token_logprobs == pytest.approx(final.logprobs.token_logprobs, abs=1e-3)
    assert first.model == names[1]
    assert service.client.models.delete(job.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        service.client.completions.create(model=job.fine_tuned_model, **ask)
    assert service.client.completions.create(model=names[0], **ask).model == names[0]
    assert service.client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
