"""Issue 28 on the jobs endpoints: bad input is a 4xx naming the field and nothing is stored that
breaks a listing (findings 7 and 9), a finished job can be deleted by its owner only, a key's jobs
are bounded (finding 8), and a job database that is down answers 503 (finding 5). The service runs
in this process without a worker: no training happens here."""
import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qforge.jobs.api import JobsConfig, JobService, install
from qforge.jobs.db import DatabaseError
from qforge.jobs.store import derived_id, fine_tuned_model_name
from qforge.model.load import load_model
from qforge.serve import AdapterRegistry, Engine
from qforge.serve.api import create_app
from qforge.serve.auth import ApiKey

from tests.serve.helpers import LiveServer, save_random_adapters

from .helpers import TINY_HP, chat_rows, jsonl

ALICE, BOB, CAROL, FUZZ = "alice-key-000", "bob-key-00000", "carol-key-000", "fuzz-key-0000"
KEYS = [ApiKey(ALICE, "user", "alice"), ApiKey(BOB, "user", "bob"), ApiKey(CAROL, "user", "carol"),
        ApiKey(FUZZ, "user", "fuzz")]
LIMIT = 3


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def service(tiny_base, tmp_path_factory):
    model, tokenizer = load_model(str(tiny_base), compute_dtype=torch.float32)
    registry = AdapterRegistry(model, "tiny", max_loaded=4)
    engine = Engine(model, tokenizer, registry, max_batch=4)
    jobs = JobService(JobsConfig(data_dir=tmp_path_factory.mktemp("hostile-data"), base_model=str(tiny_base),
                                 start_worker=False, max_jobs_per_key=LIMIT), registry)
    app = create_app(engine, registry, api_keys=KEYS,
                     extensions=[lambda app, state, caller: install(app, state, caller, jobs)])
    jobs.start()
    with LiveServer(app) as server:
        server.jobs, server.store, server.model = jobs, jobs.store, model
        server.files = {key: upload(server, key, jsonl(chat_rows(4))).json()["id"]
                        for key in (ALICE, BOB, CAROL, FUZZ)}
        yield server
    jobs.stop()
    engine.stop()


def upload(service, key: str, data: bytes, name: str = "train.jsonl") -> httpx.Response:
    return httpx.post(service.url + "/files", headers=auth(key), files={"file": (name, data)},
                      data={"purpose": "fine-tune"}, timeout=60)


def create(service, key: str, raw: str | None = None, **body) -> httpx.Response:
    if raw is None:
        body = {"model": "tiny", "training_file": service.files[key],
                "method": {"type": "supervised", "supervised": {"hyperparameters": dict(TINY_HP)}}, **body}
        raw = json.dumps(body)
    return httpx.post(service.url + "/fine_tuning/jobs", headers={**auth(key), "Content-Type": "application/json"},
                      content=raw.encode(), timeout=60)


def listing(service, key: str) -> list[dict]:
    r = httpx.get(service.url + "/fine_tuning/jobs", headers=auth(key), params={"limit": 100}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def cancel_all(service, key: str) -> None:
    for job in listing(service, key):
        if job["status"] not in ("succeeded", "failed", "cancelled"):
            httpx.post(service.url + f"/fine_tuning/jobs/{job['id']}/cancel", headers=auth(key), timeout=60)


# ---- finding 7: values a job row cannot hold ---------------------------------------------------------
@pytest.mark.parametrize("raw_value, param", [
    ('{"method": {"type": "supervised", "supervised": {"hyperparameters": {"alpha": Infinity}}}}',
     "method.supervised.hyperparameters.alpha"),
    ('{"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate": NaN}}}}',
     "method.supervised.hyperparameters.learning_rate"),
    ('{"metadata": {"k": "\\ud800"}}', "metadata.k"),
    ('{"metadata": {"\\udfff": "v"}}', "metadata"),
    ('{"suffix": "a\\ud800"}', "suffix"),
])
def test_a_job_body_no_row_can_hold_is_400_naming_the_field(service, raw_value, param):
    before = listing(service, ALICE)
    extra = json.loads(raw_value.replace("Infinity", "1").replace("NaN", "1").replace("\\ud800", "x")
                       .replace("\\udfff", "y"))
    template = {"model": "tiny", "training_file": service.files[ALICE],
                "method": {"type": "supervised", "supervised": {"hyperparameters": dict(TINY_HP)}}}
    body = json.dumps({**template, **extra})
    marker = json.dumps(extra)[1:-1]
    raw = body.replace(marker, raw_value[1:-1])
    assert raw != body
    r = create(service, ALICE, raw=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert listing(service, ALICE) == before  # nothing stored; the listing still answers


def test_a_training_file_id_with_a_lone_surrogate_is_400(service):
    r = create(service, ALICE, raw='{"model": "tiny", "training_file": "\\ud800"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file", r.text
    r = httpx.get(service.url + "/files/%ED%A0%80", headers=auth(ALICE))
    assert r.status_code == 404
    listing(service, ALICE)


def test_rows_an_older_version_stored_with_infinity_or_a_lone_surrogate_do_not_break_the_listing(service):
    with service.store.transaction() as db:  # as issue 28 found them: stored by the 500 that answered
        db.execute("INSERT INTO jobs (id, owner, created_at, model, training_file, seed, metadata, hyperparameters, "
                   "method, status) VALUES (?, ?, 1, 'tiny', 'file-x', 0, ?, ?, ?, 'failed')",
                   ("ftjob-" + "cd" * 12, KEYS[1].id, '{"k": "\\ud800"}', '{"n_epochs": 1}',
                    '{"type": "supervised", "supervised": {"hyperparameters": {"alpha": Infinity}}}'))
    jobs = {j["id"]: j for j in listing(service, BOB)}
    old = jobs["ftjob-" + "cd" * 12]
    assert old["metadata"] == {"k": "\ufffd"}
    assert old["method"]["supervised"]["hyperparameters"]["alpha"] is None
    r = httpx.delete(service.url + f"/fine_tuning/jobs/{old['id']}", headers=auth(BOB))
    assert r.status_code == 200, r.text


# ---- findings 7 and 9: uploads ------------------------------------------------------------------------
def test_a_row_nested_5000_deep_is_refused_naming_its_line(service):
    deep = '{"messages": ' + "[" * 5000 + "]" * 5000 + "}\n"
    r = upload(service, ALICE, jsonl(chat_rows(1)) + deep.encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "file" and "train.jsonl:2" in r.json()["error"]["message"]
    assert "nested too deeply" in r.json()["error"]["message"]


def test_a_row_with_an_escaped_lone_surrogate_is_refused_at_upload_naming_its_line(service):
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "\ud800"}]}) + "\n"
    assert "\\ud800" in bad
    r = upload(service, ALICE, jsonl(chat_rows(2)) + bad.encode())
    assert r.status_code == 400, r.text
    assert "train.jsonl:3" in r.json()["error"]["message"] and "lone surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("char", ["\u2028", "\u0085", "\u2029"])
def test_valid_jsonl_with_a_raw_line_separator_inside_a_string_is_accepted(service, char):
    rows = chat_rows(2)
    rows[1]["messages"][1]["content"] = f"first{char}second"
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    assert char.encode() in data
    r = upload(service, ALICE, data)
    assert r.status_code == 200, r.text
    stored = httpx.get(service.url + f"/files/{r.json()['id']}/content", headers=auth(ALICE)).content
    assert stored == data
    from qforge.train.data import load_rows
    rows_back, _ = load_rows(service.store.file_path(r.json()["id"]))
    assert rows_back[1]["messages"][1]["content"] == f"first{char}second"


# ---- deleting a job ---------------------------------------------------------------------------------
def test_an_active_job_cannot_be_deleted_a_cancelled_one_can_and_only_by_its_owner(service):
    job = create(service, BOB).json()
    r = httpx.delete(service.url + f"/fine_tuning/jobs/{job['id']}", headers=auth(BOB))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished", r.text
    httpx.post(service.url + f"/fine_tuning/jobs/{job['id']}/cancel", headers=auth(BOB)).raise_for_status()
    r = httpx.delete(service.url + f"/fine_tuning/jobs/{job['id']}", headers=auth(ALICE))
    assert r.status_code == 404  # another key's job, exactly as an unknown id
    unknown = httpx.delete(service.url + "/fine_tuning/jobs/ftjob-000000000000000000000000", headers=auth(ALICE))
    assert unknown.status_code == 404
    assert r.json()["error"]["message"].replace(job["id"], "X") == \
        unknown.json()["error"]["message"].replace("ftjob-000000000000000000000000", "X")
    r = httpx.delete(service.url + f"/fine_tuning/jobs/{job['id']}", headers=auth(BOB))
    assert r.status_code == 200 and r.json() == {"id": job["id"], "object": "fine_tuning.job", "deleted": True}
    assert httpx.get(service.url + f"/fine_tuning/jobs/{job['id']}", headers=auth(BOB)).status_code == 404
    assert httpx.get(service.url + f"/fine_tuning/jobs/{job['id']}/events", headers=auth(BOB)).status_code == 404
    assert job["id"] not in [j["id"] for j in listing(service, BOB)]
    assert not service.store.job_dir(job["id"]).exists()
    assert httpx.delete(service.url + f"/fine_tuning/jobs/{job['id']}", headers=auth(BOB)).status_code == 404


def test_deleting_a_succeeded_job_removes_its_model_results_file_folder_and_rows(service):
    store, job_id = service.store, "ftjob-" + "ab" * 12
    store.add_job({"id": job_id, "owner": KEYS[0].id, "created_at": 1, "model": "tiny", "training_file": "f",
                   "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                   "hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}, "status": "queued"})
    store.update_job(job_id, status="running")
    store.add_checkpoint(job_id, 1, {"step": 1}, f"jobs/{job_id}/run/checkpoints/step-000001")
    save_random_adapters(service.model, store.job_dir(job_id) / "run", ["adapter"], seed=3)
    results = {"file_id": derived_id("file", job_id, "results"), "filename": "step_metrics.csv",
               "purpose": "fine-tune-results", "size": 5, "rows": None, "fmt": "csv"}
    store.file_path(results["file_id"], "fine-tune-results").write_text("step\n")
    name = fine_tuned_model_name("tiny", None, job_id)
    assert store.complete_job(job_id, name, 10, results)
    assert httpx.get(service.url + f"/models/{name}", headers=auth(ALICE)).status_code == 200
    assert name in service.jobs.registry
    r = httpx.delete(service.url + f"/fine_tuning/jobs/{job_id}", headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert name not in service.jobs.registry
    assert httpx.get(service.url + f"/models/{name}", headers=auth(ALICE)).status_code == 404
    assert httpx.get(service.url + f"/files/{results['file_id']}", headers=auth(ALICE)).status_code == 404
    assert not store.file_path(results["file_id"], "fine-tune-results").exists()
    assert not store.job_dir(job_id).exists() and not list(store.jobs_dir.glob(f".{job_id}*"))
    assert store.list_events(job_id)[0] == [] and store.list_checkpoints(job_id)[0] == []


# ---- finding 8: a key's jobs are bounded -------------------------------------------------------------
def test_a_key_past_its_job_limit_gets_429_naming_the_limit_and_others_go_on(service):
    made = [create(service, CAROL) for _ in range(LIMIT)]
    assert [r.status_code for r in made] == [200] * LIMIT, [r.text for r in made]
    r = create(service, CAROL)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_jobs" and f"the limit is {LIMIT}" in error["message"]
    assert "--max-jobs-per-key" in error["message"]
    assert len(listing(service, CAROL)) == LIMIT
    assert create(service, BOB).status_code == 200  # another key is not affected
    httpx.post(service.url + f"/fine_tuning/jobs/{made[0].json()['id']}/cancel", headers=auth(CAROL))
    assert create(service, CAROL).status_code == 200  # a cancelled job frees its place
    cancel_all(service, CAROL)
    cancel_all(service, BOB)


# ---- finding 5: a database that is down -------------------------------------------------------------
@pytest.mark.parametrize("error", [DatabaseError("cannot reach the job database 'postgresql://x': refused"),
                                   __import__("sqlite3").OperationalError("unable to open database file"),
                                   __import__("sqlite3").DatabaseError("database disk image is malformed")])
def test_a_job_database_that_is_down_answers_503_not_500(service, monkeypatch, error):
    def down(*args, **kwargs):
        raise error

    for method in ("list_jobs", "add_file", "list_files"):
        monkeypatch.setattr(service.store, method, down)
    r = httpx.get(service.url + "/fine_tuning/jobs", headers=auth(ALICE))
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
    assert "Retry-After" in r.headers
    assert httpx.get(service.url + "/files", headers=auth(ALICE)).status_code == 503
    assert upload(service, ALICE, jsonl(chat_rows(1))).status_code == 503
    assert not [p for p in service.store.files_dir.iterdir() if p.name.startswith(".upload")]


# ---- a property-based fuzz over the jobs and files endpoints' bodies ----------------------------------
# Text with lone surrogates and every plane; numbers huge, NaN and infinite; nesting deep; the real
# file id and model name often enough that some bodies get past the first checks.
TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=12) | st.sampled_from(
    ["\ud800", "\udfff", "a\ud800b", "\u2028", "\x00", "tiny", "", "ftjob-" + "0" * 24])
NUMBER = st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
JSON = st.recursive(st.none() | st.booleans() | NUMBER | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
HP_KEYS = ["n_epochs", "batch_size", "learning_rate_multiplier", "alpha", "rank", "method", "max_seq_len",
           "save_every", "learning_rate", "beta"]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def job_bodies(draw) -> str:
    body = {}
    for key, value in (("model", st.sampled_from(["tiny"]) | JSON), ("training_file", st.just("FILE") | JSON),
                       ("validation_file", JSON), ("suffix", JSON), ("seed", JSON), ("metadata", JSON),
                       ("hyperparameters", st.dictionaries(st.sampled_from(HP_KEYS), JSON, max_size=3) | JSON)):
        if draw(st.booleans()):
            body[key] = draw(value)
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["supervised", "dpo", "orpo", "full"]) | TEXT)
        body["method"] = {"type": kind, kind: {"hyperparameters": draw(
            st.dictionaries(st.sampled_from(HP_KEYS), JSON, max_size=3))}}
    raw = json.dumps(body)  # ensure_ascii: lone surrogates travel as \\ud800 escapes; NaN/Infinity as literals
    if draw(st.integers(0, 9)) == 0:
        raw = raw[:-1] + (", " if body else "") + f'"deep": {deep(draw(st.integers(100, 6000)))}' + "}"
    return raw


@pytest.fixture(scope="module")
def fuzz_file(service):
    return service.files[FUZZ]


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(raw=job_bodies())
def test_fuzzed_job_bodies_never_answer_5xx_and_listings_still_answer(service, fuzz_file, raw):
    r = create(service, FUZZ, raw=raw.replace('"FILE"', json.dumps(fuzz_file)))
    assert r.status_code < 500, (raw[:300], r.text[:300])
    if r.status_code == 200:
        job_id = r.json()["id"]
        httpx.post(service.url + f"/fine_tuning/jobs/{job_id}/cancel", headers=auth(FUZZ))
        assert httpx.get(service.url + f"/fine_tuning/jobs/{job_id}/events", headers=auth(FUZZ)).status_code == 200
    listing(service, FUZZ)


@st.composite
def uploads(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            lines.append(json.dumps({"messages": [{"role": "user", "content": draw(TEXT)},
                                                  {"role": "assistant", "content": draw(TEXT)}]},
                                    ensure_ascii=draw(st.booleans())))
        elif choice == 1:
            lines.append(json.dumps(draw(JSON)))
        elif choice == 2:
            lines.append('{"messages": ' + deep(draw(st.integers(1, 6000))) + "}")
        elif choice == 3:
            lines.append(json.dumps(draw(st.dictionaries(st.sampled_from(["input", "preferred_output", "prompt",
                                                                          "text", "messages", "chosen"]), JSON))))
        else:
            lines.append(draw(TEXT))
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    return data if draw(st.booleans()) else data + b"\n"


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=uploads(), name=TEXT, query=st.dictionaries(st.sampled_from(["after", "limit", "order", "purpose"]),
                                                         TEXT, max_size=3))
def test_fuzzed_uploads_and_queries_never_answer_5xx_and_listings_still_answer(service, data, name, query):
    r = httpx.post(service.url + "/files", headers=auth(FUZZ), timeout=60,
                   files={"file": (name.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), data)},
                   data={"purpose": "fine-tune"})
    assert r.status_code < 500, (data[:200], r.text[:300])
    if r.status_code == 200:
        file_id = r.json()["id"]
        assert httpx.get(service.url + f"/files/{file_id}/content", headers=auth(FUZZ)).content == data
        assert httpx.delete(service.url + f"/files/{file_id}", headers=auth(FUZZ)).status_code == 200
    params = {k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k, v in query.items()}
    for path in ("/files", "/fine_tuning/jobs"):
        answer = httpx.get(service.url + path, headers=auth(FUZZ), params=params)
        assert answer.status_code < 500, answer.text[:300]
    listing(service, FUZZ)
    assert httpx.get(service.url + "/files", headers=auth(FUZZ)).status_code == 200
