"""The whole cycle on the embedded SmolLM2-135M-Instruct through the official openai client, as a user
of OpenAI's fine-tuning API would write it: upload training and validation files, create a job (the
memory planner picks the method), poll it to success, read its events, checkpoints and results file,
and chat with the fine-tuned model on the same server."""
import math
import time

import openai
import pytest

from qforge.eval.tasks import DEMO_TASK_DIR

from .helpers import InProcessService

pytestmark = pytest.mark.slow
KEY = "cycle-key"
STEPS = 2


def lines(name: str, n: int) -> bytes:
    return "".join((DEMO_TASK_DIR / name).read_text().splitlines(keepends=True)[:n]).encode()


def test_the_openai_client_runs_the_whole_fine_tuning_cycle(tmp_path):
    with InProcessService("smollm2", tmp_path / "data", keys=[KEY]) as service:
        client = openai.OpenAI(base_url=service.url, api_key=KEY, max_retries=0, timeout=120)
        train = client.files.create(file=("extract.jsonl", lines("train.jsonl", 16)), purpose="fine-tune")
        valid = client.files.create(file=("extract-val.jsonl", lines("val.jsonl", 2)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="smollm2", training_file=train.id, validation_file=valid.id, suffix="extract", seed=3,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "batch_size": 2, "learning_rate_multiplier": 2.0, "rank": 8, "max_seq_len": 128, "max_steps": STEPS,
                "save_every": 1}}})
        assert job.status == "validating_files"
        deadline = time.monotonic() + 600
        while job.status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {job.status}"
            time.sleep(1)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:smollm2:extract:{job.id}" and job.trained_tokens > 0
        assert job.finished_at >= job.created_at and job.method.supervised.hyperparameters.model_dump()["method"] in (
            "qlora", "lora")

        events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))[::-1]  # every page, oldest first
        messages = [e.message for e in events]
        assert messages[0] == f"Created fine-tuning job: {job.id}"
        assert messages[-1] == "The job has successfully completed"
        assert any(m.startswith("Training method: ") and "memory budget" in m for m in messages)
        metrics = [e.data for e in events if e.type == "metrics"]
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
        assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["valid_loss"]) for m in metrics)

        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == list(range(STEPS, 0, -1))
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{STEPS}"
        assert checkpoints[0].metrics.train_loss == pytest.approx(metrics[-1]["train_loss"])
        results = client.files.content(job.result_files[0]).text.splitlines()
        assert results[0] == "step,train_loss,valid_loss,learning_rate,tokens" and len(results) == 1 + STEPS

        assert job.fine_tuned_model in [m.id for m in client.models.list()]
        question = [{"role": "system", "content": "Extract the person's name, age, city and job as JSON."},
                    {"role": "user", "content": "Ana Silva, 34, is a nurse in Lisbon."}]
        tuned = client.chat.completions.create(model=job.fine_tuned_model, messages=question, max_tokens=16,
                                               temperature=0)
        base = client.chat.completions.create(model="smollm2", messages=question, max_tokens=16, temperature=0)
        assert tuned.model == job.fine_tuned_model and tuned.choices[0].message.content
        assert base.choices[0].message.content and tuned.usage.prompt_tokens == base.usage.prompt_tokens
        assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
