"""Issue 28, the inference server's findings, each as a test: bounded work per request (token
budgets before any forward, embeddings in chunks), owners on every delete path and the adapter
root kept out of the data folder, the API answering while a forward runs, slow clients bounded at
the connection, bad input a 4xx, keys files with a BOM or non-ASCII keys, an evicted adapter whose
files went away."""
import json
import shutil
import threading

import httpx
import numpy as np
import pytest

from qforge.serve import AdapterRegistry, Engine, Metrics
from qforge.serve.api import create_app
from qforge.serve.auth import ApiKey, read_keys_file

from .helpers import LiveServer, save_random_adapters, tiny_llama

OPERATOR, ALICE, BOB = "operator-key-0", "alice-key-000", "bob-key-00000"
KEYS = [ApiKey(OPERATOR, "operator", "ops"), ApiKey(ALICE, "user", "alice"), ApiKey(BOB, "user", "bob")]


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=5)
    save_random_adapters(model, root, ["a", "b", "mine", "data/jobs/job-x/run/adapter"])
    metrics = Metrics()
    registry = AdapterRegistry(model, "tiny", max_loaded=4, adapter_root=root, metrics=metrics)
    registry.add("a", root / "a", trusted=True)  # the operator's, from the command line
    registry.forbid(root / "data")                # the jobs service's data folder (app.build_server does this)
    engine = Engine(model, tokenizer, registry, max_batch=4, max_queue=32, metrics=metrics)
    app = create_app(engine, registry, api_keys=KEYS, metrics=metrics)
    with LiveServer(app) as server:
        server.engine, server.registry, server.root_dir = engine, registry, root
        server.state = app.state.qforge
        yield server
    engine.stop()


def post(live, path, body, key=ALICE, **kw):
    # json.dumps escapes a lone surrogate as \ud800 and writes NaN, as careless clients do
    return httpx.post(live.url + path, content=json.dumps(body), headers=auth(key) | {
        "content-type": "application/json"}, timeout=120, **kw)


class CountingEmbed:
    """engine.embed wrapped: records each call's (rows, padded width)."""

    def __init__(self, engine):
        self.engine, self.original, self.calls = engine, engine.embed, []

    def __call__(self, prompts, adapter):
        self.calls.append((len(prompts), max(len(p) for p in prompts)))
        return self.original(prompts, adapter)

    def __enter__(self):
        self.engine.embed = self
        return self

    def __exit__(self, *exc):
        del self.engine.embed


# ---- 1. bounded work per request ----------------------------------------------------------------
def test_embeddings_over_the_token_budget_are_refused_before_any_forward(live, monkeypatch):
    monkeypatch.setattr(live.state.limits, "max_request_tokens", 64)
    with CountingEmbed(live.engine) as counted:
        r = post(live, "/embeddings", {"model": "tiny", "input": [[5] * 30] * 3})
        assert r.status_code == 400, r.text
        assert "max_request_tokens is 64" in r.json()["error"]["message"] and "90 tokens" in r.json()["error"]["message"]
        assert counted.calls == []
        assert post(live, "/embeddings", {"model": "tiny", "input": [[5] * 30] * 2}).status_code == 200


def test_embeddings_run_in_bounded_chunks_and_equal_one_forward(live, monkeypatch):
    monkeypatch.setattr(live.state.limits, "embed_chunk_tokens", 16)
    inputs = [[7 + i] * (3 + i) for i in range(6)]  # 3..8 tokens
    with CountingEmbed(live.engine) as counted:
        r = post(live, "/embeddings", {"model": "a", "input": inputs})
    assert r.status_code == 200, r.text
    assert len(counted.calls) > 1 and all(rows * width <= 16 for rows, width in counted.calls)
    assert sum(rows for rows, _ in counted.calls) == len(inputs)
    whole = live.engine.embed(inputs, "a")  # the oracle: all inputs in one forward
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got, whole.numpy(), atol=1e-5)  # float32 reduction order only


def test_completions_budget_counts_prompts_times_n_and_scored_prompts(live, monkeypatch):
    monkeypatch.setattr(live.state.limits, "max_request_tokens", 100)
    monkeypatch.setattr(live.state.limits, "max_scored_tokens", 20)
    body = {"model": "tiny", "prompt": [5] * 20, "max_tokens": 5, "n": 4}  # (20 + 5) x 4 = 100: allowed
    assert post(live, "/completions", body).status_code == 200
    r = post(live, "/completions", body | {"n": 5})                       # 125
    assert r.status_code == 400 and "max_request_tokens is 100" in r.json()["error"]["message"]
    r = post(live, "/completions", {"model": "tiny", "prompt": [5] * 21, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 400 and "max_scored_tokens is 20" in r.json()["error"]["message"]
    r = post(live, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 60, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# ---- 2. owners on every delete path -------------------------------------------------------------
def test_a_user_cannot_delete_the_operators_adapter_through_models(live):
    r = httpx.delete(live.url + "/models/a", headers=auth(ALICE))
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_owner"
    assert "a" in live.registry
    assert post(live, "/adapters", {"name": "a", "path": "mine"}).status_code in (403, 409)


def test_a_user_deletes_its_own_adapter_through_models_and_another_key_sees_404(live):
    assert post(live, "/adapters", {"name": "alice:m", "path": "mine"}).status_code == 201
    assert httpx.delete(live.url + "/models/alice:m", headers=auth(BOB)).status_code == 404
    unknown = httpx.delete(live.url + "/models/alice:nothing", headers=auth(BOB))
    assert unknown.status_code == 404
    assert httpx.delete(live.url + "/models/alice:m", headers=auth(ALICE)).status_code == 200
    assert "alice:m" not in live.registry


def test_the_adapter_root_never_reaches_the_data_folder(live):
    r = post(live, "/adapters", {"name": "stolen", "path": "data/jobs/job-x/run/adapter"})
    assert r.status_code == 403 and "data folder" in r.json()["error"]["message"]
    assert str(live.root_dir) not in r.text
    (live.root_dir / "link").symlink_to(live.root_dir / "data" / "jobs", target_is_directory=True)
    assert post(live, "/adapters", {"name": "stolen", "path": "link/job-x/run/adapter"}).status_code == 403
    assert "stolen" not in live.registry


def test_checkpoint_names_are_canonical():
    from qforge.jobs.models import checkpoint_of

    assert checkpoint_of("ft:tiny:s:job-1:ckpt-step-4") == ("ft:tiny:s:job-1", 4)
    assert checkpoint_of("ft:tiny:s:job-1:ckpt-step-000004") is None  # no second name for step 4
    assert checkpoint_of("ft:tiny:s:job-1:ckpt-step-0") == ("ft:tiny:s:job-1", 0)


def test_a_listing_cursor_of_another_key_pages_like_an_unknown_id(tmp_path):
    from qforge.jobs.pg import open_store

    store = open_store(tmp_path)
    for file_id, owner in (("file-a1", "alice"), ("file-b1", "bob"), ("file-a2", "alice")):
        store.add_file(file_id, owner, "x.jsonl", "fine-tune", 10, 1, "chat")
    assert store.list_files("alice", after="file-b1") == store.list_files("alice", after="file-none")
    assert [r["id"] for r in store.list_files("alice", after="file-a2")[0]] == ["file-a1"]


# ---- 3. the API never waits on the model --------------------------------------------------------
def test_health_and_listings_answer_while_a_forward_runs(live):
    model = live.engine.model
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    original = model.forward

    def slow_forward(*args, **kwargs):
        started.set()
        release.wait(120)  # held until the test has its answers (or a generous bound on a broken server)
        return original(*args, **kwargs)

    model.forward = slow_forward
    answers = {}

    def complete():
        answers["completion"] = post(live, "/completions", {"model": "a", "prompt": "Hi", "max_tokens": 1})
        finished.set()

    worker = threading.Thread(target=complete)
    worker.start()
    try:
        assert started.wait(60)
        for path in ("/health", "/v1/models", "/v1/adapters", "/v1/usage"):
            r = httpx.get(live.root + path, headers=auth(OPERATOR), timeout=60)
            assert r.status_code == 200, (path, r.text)
            assert not finished.is_set()  # answered while the forward was still held
    finally:
        release.set()
        worker.join(120)
        del model.forward
    assert answers["completion"].status_code == 200


def test_health_reports_a_degraded_jobs_store(live):
    from qforge.app import jobs_store_problem

    class DeadStore:
        def get_job(self, job_id):
            raise ConnectionError("cannot reach the job database\nsecond line")

    class Jobs:
        store = DeadStore()

    live.state.health_checks["jobs_store"] = lambda: jobs_store_problem(Jobs())
    try:
        body = httpx.get(live.root + "/health").json()
        assert body["status"] == "degraded"
        assert body["degraded"] == {"jobs_store": "ConnectionError: cannot reach the job database"}
    finally:
        del live.state.health_checks["jobs_store"]
    assert httpx.get(live.root + "/health").json()["status"] == "ok"


def test_a_hanging_store_check_holds_one_thread_however_often_health_is_asked(live):
    release, calls = threading.Event(), []

    def hangs():
        calls.append(1)
        release.wait(120)
        return None

    live.state.health_checks["jobs_store"] = hangs
    try:
        for _ in range(3):
            body = httpx.get(live.root + "/health", timeout=60).json()
            assert body["status"] == "degraded" and body["degraded"]["jobs_store"].startswith("no answer")
        assert len(calls) == 1
    finally:
        release.set()
        del live.state.health_checks["jobs_store"]


# ---- 7. bad input: a 4xx, never a 5xx -----------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"x": 1}]},
        {"role": "user", "content": "again"}]}),
    ("/embeddings", {"model": "tiny", "input": "\ud800"}),
    ("/embeddings", {"model": "tiny", "input": ["ok", "\ud800"]}),
    ("/embeddings", {"model": "\ud800", "input": "hi"}),
    ("/completions", {"model": "\ud800", "prompt": "hi"}),
    ("/chat/completions", {"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}),
    ("/adapters", {"name": "sur", "path": "\ud800"}),
    ("/adapters", {"name": "\ud800", "path": "mine"}),
])
def test_bad_text_and_tool_calls_are_400(live, path, body):
    r = post(live, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_an_exploding_pattern_is_refused_before_compiling(live):
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^((a{1000}){1000}){1000}$"}}}
    r = post(live, "/chat/completions", {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
                                         "response_format": {"type": "json_schema", "json_schema": {
                                             "name": "s", "schema": schema}}})
    assert r.status_code == 400 and "counted repetitions" in r.json()["error"]["message"]
    assert "<state>" not in r.text


def test_pattern_repeat_multiplies_nested_counts():
    from qforge.serve.structured import pattern_repeat

    assert pattern_repeat("^((a{1000}){1000}){1000}$") == 10 ** 9
    assert pattern_repeat(r"^\d{4}-\d{2}$") == 4
    assert pattern_repeat("(a{10}b{20}){30}") == 600
    assert pattern_repeat("^[a-z{}]{3,10}$") == 10  # braces inside a class are characters
    assert pattern_repeat(r"\((a{7})\)") == 7        # escaped parentheses open no group


def nested(depth: int) -> str:
    """A JSON schema text nested `depth` deep (written as text: json.dumps itself recurses)."""
    return '{"k":[' * depth + "1" + "]}" * depth


@pytest.mark.parametrize("depth", [40, 400, 5000])
def test_deep_nesting_is_400(live, depth):
    body = ('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": '
            '{"type": "json_schema", "json_schema": {"name": "n", "schema": %s}}}' % nested(depth))
    r = httpx.post(live.url + "/chat/completions", content=body, timeout=60,
                   headers=auth(ALICE) | {"content-type": "application/json"})
    assert r.status_code == 400, r.text


# ---- 9. keys files; an adapter whose files went away ---------------------------------------------
def test_a_keys_file_with_a_bom_works_and_a_non_ascii_key_is_refused_naming_its_line(tmp_path):
    bom = tmp_path / "keys-bom.txt"
    bom.write_bytes("\ufeffsecret-key-1 user alice\n".encode())
    assert read_keys_file(bom)[0].key == "secret-key-1"
    bad = tmp_path / "keys-utf8.txt"
    bad.write_text("secret-key-1 user alice\nsecret-clé-22 user bob\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"keys-utf8.txt:2: .*printable ASCII"):
        read_keys_file(bad)
    with pytest.raises(ValueError, match="printable ASCII"):
        ApiKey("clé-secrète-1", "user", "u")


def test_an_evicted_adapter_whose_files_were_deleted_is_503_naming_the_model(tokenizer, tmp_path):
    model = tiny_llama(tokenizer, seed=6)
    paths = save_random_adapters(model, tmp_path, ["one", "two"])
    registry = AdapterRegistry(model, "tiny", max_loaded=1)
    for name, folder in paths.items():
        registry.add(name, folder, trusted=True)  # the second evicts the first
    engine = Engine(model, tokenizer, registry, max_batch=2)
    app = create_app(engine, registry)
    shutil.rmtree(paths["one"])
    try:
        with LiveServer(app) as server:
            r = httpx.post(server.url + "/completions", json={"model": "one", "prompt": "hi", "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 503, r.text
            assert "'one'" in r.json()["error"]["message"] and str(tmp_path) not in r.text
            e = httpx.post(server.url + "/embeddings", json={"model": "one", "input": "hi"}, timeout=60)
            assert e.status_code == 503 and str(tmp_path) not in e.text
            assert httpx.post(server.url + "/completions", json={"model": "two", "prompt": "hi", "max_tokens": 2},
                              timeout=60).status_code == 200
    finally:
        engine.stop()


def test_registry_reads_do_not_wait_on_the_slot_lock(live):
    done = threading.Event()

    def read():
        live.registry.entries(), live.registry.loaded_names(), live.registry.names(), ("a" in live.registry)
        live.registry.entry("a")
        done.set()

    with live.registry.lock:  # what the engine holds for a whole forward
        reader = threading.Thread(target=read)
        reader.start()
        assert done.wait(60)
    reader.join()



# ---- the server as `qforge serve --jobs` builds it ------------------------------------------------
@pytest.mark.slow  # builds the whole jobs service
def test_built_server_keeps_the_adapter_root_out_of_the_data_folder_and_reports_its_store(tiny_base, tmp_path):
    """build_server forbids the jobs' data folder to run-time adapters even when --adapter-root is
    that folder, and /health reports the jobs store degraded when its database cannot be read."""
    from tests.jobs.helpers import InProcessService

    data = tmp_path / "data"
    with InProcessService(tiny_base, data, keys=[ALICE], start_worker=False, adapter_root=str(tmp_path)) as live:
        with live.engine.registry.lock:  # the served model's adapters are copied, not touched, meanwhile
            save_random_adapters(live.engine.model, data / "jobs" / "job-x" / "run", ["adapter"])
        r = httpx.post(live.url + "/adapters", json={"name": "stolen", "path": "data/jobs/job-x/run/adapter"},
                       headers=auth(ALICE), timeout=60)
        assert r.status_code == 403, r.text
        assert httpx.get(live.root + "/health").json()["status"] == "ok"
        store = live.jobs.store
        broken = _break(store)
        try:
            body = httpx.get(live.root + "/health").json()
            assert body["status"] == "degraded" and "jobs_store" in body["degraded"]
        finally:
            broken()


def _break(store):
    """Make the store's reads fail as an unreachable database does; returns the undo."""
    original = store.get_job

    def unreachable(*args, **kwargs):
        raise ConnectionError("cannot reach the job database")

    store.get_job = unreachable
    return lambda: setattr(store, "get_job", original)
