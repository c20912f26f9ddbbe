"""kill -9 of the whole server mid-job, for real: `python -m qforge serve --jobs` in a subprocess. Its
worker and trainer die with it; a new server on the same data dir resumes the job from its last
checkpoint and finishes it; the upload, events, checkpoints and the fine-tuned model are all there,
each once, and the model answers chat on the new server."""
import collections

import openai
import pytest

from qforge.jobs.store import JobStore, pid_alive
from qforge.jobs.worker import _read_result

from .helpers import ServerProcess, chat_rows, job_create_body, jsonl, wait_for

pytestmark = pytest.mark.slow
STEPS = 8


def test_kill_9_of_the_server_mid_job_loses_and_doubles_nothing(tiny_base, tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    upload = jsonl(chat_rows(8))
    server = ServerProcess(tiny_base, data_dir, log).wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
        file = client.files.create(file=("train.jsonl", upload), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(**job_create_body(file.id, "tiny", max_steps=STEPS), suffix="phoenix")
        wait_for(lambda: len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 2, 240, 0.2, "two checkpoints")
        row = JobStore(data_dir).get_job(job.id)
        assert row["status"] == "running" and pid_alive(row["worker_pid"]) and pid_alive(row["train_pid"])
        server.kill()
        for pid in (row["worker_pid"], row["train_pid"]):  # nothing trains on behind a dead server
            wait_for(lambda: not pid_alive(pid), 15, 0.1, f"process {pid} to die with the server")
        # The kill may land after the trainer wrote its result (its last steps are short on an idle
        # machine): then the new worker records that result instead of training again. Which of the
        # two the kill met is read here, once every process of the first server is gone.
        # (read by the worker's own helper: the test and run_job's branch share one definition)
        trained_before_kill = _read_result(JobStore(data_dir).job_dir(job.id)).get("status") == "succeeded"
    finally:
        server.stop()

    server = ServerProcess(tiny_base, data_dir, log).wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
        job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
                       300, 0.5, "the resumed job to finish")
        assert job.status == "succeeded" and job.fine_tuned_model == f"ft:tiny:phoenix:{job.id}", job.error
        assert client.files.content(file.id).content == upload
        assert [f.id for f in client.files.list(purpose="fine-tune")] == [file.id]
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
        steps = collections.Counter(e.data["step"] for e in events if e.type == "metrics")
        assert steps == collections.Counter(range(1, STEPS + 1))
        checkpoints = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)]
        assert sorted(checkpoints) == list(range(1, STEPS + 1))
        messages = [e.message for e in events]
        assert messages.count("Fine-tuning job started") == messages.count(f"Created fine-tuning job: {job.id}") == 1
        resumed = any(m.startswith("Resuming the job from its last checkpoint") for m in messages)
        assert resumed != trained_before_kill, (trained_before_kill, messages)
        assert JobStore(data_dir).get_job(job.id)["attempts"] == 2
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                               messages=[{"role": "user", "content": "Who is Bo?"}])
        assert reply.model == job.fine_tuned_model and reply.choices[0].message.content
    finally:
        server.stop()
