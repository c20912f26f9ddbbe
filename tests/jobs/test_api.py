"""The files and jobs API through the official openai client, in-process and without a worker (jobs
stay queued; nothing trains): uploads validated and stored under our own names, job requests checked,
the memory planner's choice, cancel, pages, two keys that cannot see each other's files, jobs and
fine-tuned models, and a finished job's model served the moment the job says it succeeded."""
import json

import httpx
import openai
import pytest
import torch

from qforge.jobs.api import JobsConfig, JobService, install
from qforge.model.load import load_model
from qforge.plan import load_arch, plan_run
from qforge.serve import AdapterRegistry, Engine
from qforge.serve.api import create_app

from tests.serve.helpers import LiveServer, save_random_adapters

from .helpers import chat_rows, job_create_body, jsonl, wait_for

KEY, OTHER = "key-one", "key-two"
MAX_FILE = 4096


@pytest.fixture(scope="module")
def live(tiny_base, tmp_path_factory):
    model, tokenizer = load_model(str(tiny_base), compute_dtype=torch.float32)
    registry = AdapterRegistry(model, "tiny")
    engine = Engine(model, tokenizer, registry, max_batch=4)
    config = JobsConfig(data_dir=tmp_path_factory.mktemp("jobs-data"), base_model=str(tiny_base),
                        max_file_bytes=MAX_FILE, start_worker=False)
    jobs = JobService(config, registry)
    app = create_app(engine, registry, api_keys=[KEY, OTHER],
                     extensions=[lambda app, state, caller: install(app, state, caller, jobs)])
    jobs.start()
    with LiveServer(app) as server:
        server.jobs, server.model, server.registry = jobs, model, registry
        yield server
    jobs.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def other(live):
    return openai.OpenAI(base_url=live.url, api_key=OTHER, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def training_file(client):
    return client.files.create(file=("train.jsonl", jsonl(chat_rows(6))), purpose="fine-tune")


def queued(client, job_id):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status != "validating_files" and j,
                    30, what="validation")


# ---- files ---------------------------------------------------------------------------------------
def test_upload_list_retrieve_content_delete(client, live):
    data = jsonl(chat_rows(3))
    f = client.files.create(file=("../../etc/evil name.jsonl", data), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.purpose == "fine-tune"
    assert f.filename == "evil name.jsonl"  # shown as sent, minus the path; never used to store it
    stored = live.jobs.store.file_path(f.id)
    assert stored.parent == live.jobs.store.files_dir and stored.name == f"{f.id}.jsonl"
    assert client.files.retrieve(f.id).filename == "evil name.jsonl"
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.content(f.id).content == data
    assert client.files.delete(f.id).deleted
    assert not stored.exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_a_bad_line_is_refused_with_its_number(client, live):
    lines = [json.dumps(r) for r in chat_rows(2)] + ['{"messages": [{"role": "user", "content": "hi"}]}']
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("mine.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    message = caught.value.body["message"]
    assert "mine.jsonl:3: no assistant message" in message and str(live.jobs.store.root) not in message
    with pytest.raises(openai.BadRequestError, match="mine.jsonl:1: bad JSON"):
        client.files.create(file=("mine.jsonl", b"{not json}\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="empty dataset"):
        client.files.create(file=("mine.jsonl", b"\n\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("mine.jsonl", jsonl(chat_rows(1))), purpose="batch")
    assert list(live.jobs.store.files_dir.glob(".upload-*")) == []  # nothing left behind


def test_uploads_over_the_size_limit_are_refused(client, live):
    big = jsonl(chat_rows(60))
    assert MAX_FILE < len(big) < MAX_FILE + 2 ** 16
    with pytest.raises(openai.APIStatusError) as caught:  # read past the limit: stopped while copying
        client.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "file_too_large"
    with pytest.raises(openai.APIStatusError) as caught:  # declared too large: refused unread
        client.files.create(file=("huge.jsonl", big * 40), purpose="fine-tune")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "body_too_large"
    assert list(live.jobs.store.files_dir.glob(".upload-*")) == []


# ---- jobs ----------------------------------------------------------------------------------------
def test_a_new_job_is_validated_then_queued(client, training_file, live):
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training_file.id, suffix="first", seed=7,
                                         metadata={"team": "a"}, hyperparameters={"n_epochs": 2},
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "method": "lora", "rank": 4, "max_seq_len": 64}}})
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.seed == 7 and job.metadata == {"team": "a"} and job.fine_tuned_model is None
    job = queued(client, job.id)
    assert job.status == "queued"
    hp = job.method.supervised.hyperparameters.model_dump()
    assert hp["method"] == "lora" and hp["rank"] == 4 and hp["n_epochs"] == 2 and hp["batch_size"] == 4
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.learning_rate_multiplier == 1.0
    config = (live.jobs.store.job_dir(job.id) / "config.yaml").read_text()
    assert "method: lora" in config and "epochs: 2" in config and "resume: auto" in config
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50)]
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    assert messages[0] == "Files validated, moving job to queued state"
    assert "Training method: lora (asked for)" in messages


def test_auto_is_qlora_and_its_event_says_whether_the_plan_fits(client, training_file, live):
    hp = {"rank": 4, "batch_size": 2, "max_seq_len": 64}
    qlora_bytes = plan_run(load_arch(live.jobs.config.base_model), "qlora", seq_len=64, batch_size=2,
                           rank=4, chunked_loss=True, residual_bytes=4).per_gpu_total  # as qforge train runs
    chosen = {}
    for budget in (qlora_bytes - 1, qlora_bytes, 10 ** 12):
        live.jobs.config.memory_budget = budget
        job = client.fine_tuning.jobs.create(model="tiny", training_file=training_file.id, method={
            "type": "supervised", "supervised": {"hyperparameters": hp}})
        job = queued(client, job.id)
        reason = next(e.message for e in client.fine_tuning.jobs.list_events(job.id) if "Training method" in e.message)
        chosen[budget] = (job.method.supervised.hyperparameters.model_dump()["method"], reason)
    live.jobs.config.memory_budget = None
    assert {method for method, _ in chosen.values()} == {"qlora"}  # qforge train's default, whatever the budget
    assert "over the" in chosen[qlora_bytes - 1][1] and "lower max_seq_len" in chosen[qlora_bytes - 1][1]
    assert "over the" not in chosen[qlora_bytes][1] and "memory budget" in chosen[qlora_bytes][1]
    assert "of the 1000.0 GB memory budget" in chosen[10 ** 12][1]


@pytest.mark.parametrize("change, param", [
    ({"model": "gpt-4o"}, "model"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"validation_file": "file-doesnotexist"}, "validation_file"),
    ({"suffix": "no spaces allowed"}, "suffix"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "dpo"}}, "training_file"),  # a supervised file for a DPO job
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate": 1}}}},
     "method.supervised.hyperparameters.learning_rate"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
])
def test_bad_job_requests_are_refused(client, training_file, change, param):
    body = {"model": "tiny", "training_file": training_file.id, **change}
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**body)
    assert caught.value.body["param"] == param


def test_cancel_a_queued_job_and_page_through_jobs_and_events(client, training_file):
    made = [client.fine_tuning.jobs.create(**job_create_body(training_file.id, "tiny")).id for _ in range(3)]
    for job_id in made:
        queued(client, job_id)
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == made[::-1][:2] and first.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1, after=made[1]).data] == [made[0]]
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # the client follows `after` itself
    assert listed[:3] == made[::-1] and len(listed) == len(set(listed))
    job = client.fine_tuning.jobs.cancel(made[0])
    assert job.status == "cancelled" and job.finished_at is not None
    assert client.fine_tuning.jobs.cancel(made[0]).status == "cancelled"
    events = [e.message for e in client.fine_tuning.jobs.list_events(made[0], limit=2)]  # every page
    assert events[0] == "The job was cancelled" and len(events) == len(set(events)) == 5


# ---- keys and fine-tuned models -------------------------------------------------------------------
def finish_by_hand(live, job_id: str) -> str:
    """Make a queued job look succeeded, with a random adapter as its result (no worker runs here)."""
    store = live.jobs.store
    with live.registry.lock:
        save_random_adapters(live.model, store.job_dir(job_id) / "run", ["adapter"])
    job = store.get_job(job_id)
    store.update_job(job_id, status="running")
    name = f"ft:tiny:{job['suffix'] or ''}:{job_id}"
    assert store.complete_job(job_id, name, 123, None)
    return name


def test_a_finished_model_is_served_the_moment_its_job_succeeds(client, training_file, live, monkeypatch):
    job = queued(client, client.fine_tuning.jobs.create(**job_create_body(training_file.id, "tiny"), suffix="now").id)
    monkeypatch.setattr(live.jobs.store, "succeeded_models", lambda: [])  # the watcher sees nothing
    name = finish_by_hand(live, job.id)
    assert name not in live.registry
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, temperature=0)
    assert reply.model == name and reply.usage.completion_tokens >= 1
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model == name and job.trained_tokens == 123


def test_another_key_sees_none_of_my_files_jobs_or_models(client, other, training_file, live):
    job = queued(client, client.fine_tuning.jobs.create(**job_create_body(training_file.id, "tiny"), suffix="mine").id)
    name = finish_by_hand(live, job.id)
    wait_for(lambda: name in live.registry, 10, what="the watcher to register the model")
    file_id = training_file.id
    calls = [lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id),
             lambda: other.files.delete(file_id), lambda: other.fine_tuning.jobs.retrieve(job.id),
             lambda: other.fine_tuning.jobs.cancel(job.id), lambda: other.fine_tuning.jobs.list_events(job.id),
             lambda: other.fine_tuning.jobs.checkpoints.list(job.id), lambda: other.models.retrieve(name),
             lambda: other.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}]),
             lambda: other.delete(f"/adapters/{name}", cast_to=object)]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as mine:  # someone else's file reads as no file at all
        other.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    with pytest.raises(openai.BadRequestError) as nobody:
        other.fine_tuning.jobs.create(model="tiny", training_file="file-000000000000000000000000")
    assert mine.value.body["message"].replace(file_id, "X") == nobody.value.body["message"].replace(
        "file-000000000000000000000000", "X")
    assert file_id not in [f.id for f in other.files.list()]
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    assert name not in [m.id for m in other.models.list()] and name in [m.id for m in client.models.list()]
    assert name not in [a["id"] for a in other.get("/adapters", cast_to=object)["data"]]
    assert client.files.retrieve(file_id).id == file_id  # all still there for their owner
    assert client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).model == name
    assert httpx.get(live.url + "/files").status_code == 401


def test_the_dashboard_is_served(live):
    page = httpx.get(live.root + "/")
    assert page.status_code == 200 and "<title>qforge" in page.text
    script = httpx.get(live.root + "/dashboard/app.js")
    assert script.status_code == 200 and "fine_tuning/jobs" in script.text
