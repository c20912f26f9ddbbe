"""The HTTP API through the official openai client (and raw httpx where the client hides things),
against a live uvicorn server on loopback serving a tiny 4-bit Llama with PEFT adapters."""
import functools
import json
import threading
import time

import httpx
import openai
import pytest

from qforge.serve import AdapterRegistry, Engine, Metrics
from qforge.serve.api import create_app
from qforge.serve.auth import ApiKey

from .helpers import LiveServer, greedy_alone, save_random_adapters, tiny_llama

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=2)
    save_random_adapters(model, root, ["a", "b", "c"])
    metrics = Metrics()
    registry = AdapterRegistry(model, "tiny", max_loaded=4, adapter_root=root, metrics=metrics)
    for name in "ab":
        registry.add(name, root / name, trusted=True)
    engine = Engine(model, tokenizer, registry, max_batch=8, metrics=metrics)
    keys = [ApiKey(KEY, "operator", "op")]  # the operator: run-time adapters, /metrics, every key's usage
    with LiveServer(create_app(engine, registry, api_keys=keys, metrics=metrics)) as server:
        server.engine, server.model, server.root_dir = engine, model, root
        yield server
    engine.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url, api_key=KEY, max_retries=0, timeout=60)


def oracle(live, prompt_ids, adapter, n):
    with live.engine.registry.lock:
        return greedy_alone(live.model, prompt_ids, adapter, n)


def chat_ids(tokenizer, messages):
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False).input_ids


def test_models_lists_the_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and set(ids[1:]) == {"a", "b"}
    assert client.models.retrieve("a").id == "a"


def test_completion_matches_the_oracle_and_counts_tokens(client, live, tokenizer):
    r = client.completions.create(model="a", prompt="The capital of France is", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tokenizer("The capital of France is").input_ids
    want = oracle(live, ids, "a", 7)
    assert r.model == "a" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 7, len(ids) + 7)


def test_chat_counts_prompt_tokens_like_the_template(client, tokenizer):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.model == "tiny"
    assert r.usage.prompt_tokens == len(chat_ids(tokenizer, CHAT))
    assert r.usage.completion_tokens == 5 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_the_plain_answer(client):
    plain = client.chat.completions.create(model="b", messages=CHAT, max_tokens=9, temperature=0)
    chunks = list(client.chat.completions.create(model="b", messages=CHAT, max_tokens=9, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump() | {
        "completion_tokens_details": None, "prompt_tokens_details": None}
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_is_sse_ending_with_done(live, client):
    plain = client.completions.create(model="a", prompt="Hello", max_tokens=6, temperature=0)
    body = {"model": "a", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain.choices[0].text
    assert "usage" not in chunks[-1]  # not asked for


def test_several_adapters_at_once_match_the_oracle(client, live, tokenizer):
    prompts = ["Once upon a time", "Hello there", "x", "The capital of France is"]
    jobs = [(p, m) for p in prompts for m in ("tiny", "a", "b")]
    results = {}

    def ask(i, prompt, model):
        stream = i % 2 == 0
        r = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stream=stream,
                                      extra_body={"ignore_eos": True})
        results[i] = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i, p, m)) for i, (p, m) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (prompt, model) in enumerate(jobs):
        want = oracle(live, tokenizer(prompt).input_ids, None if model == "tiny" else model, 6)
        assert results[i] == tokenizer.decode(want, skip_special_tokens=True), (prompt, model)
    assert len(set(results.values())) > len(prompts)


def test_n_choices_and_prompt_lists(client):
    r = client.completions.create(model="a", prompt=["Hi", "Hello there"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 6
    r = client.chat.completions.create(model="a", messages=CHAT, max_tokens=4, n=3, seed=5, temperature=1.0)
    assert len(r.choices) == 3 and len({c.message.content for c in r.choices}) >= 2
    again = client.chat.completions.create(model="a", messages=CHAT, max_tokens=4, n=3, seed=5, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_adapter_loaded_and_unloaded_at_run_time(client, live):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="Hi", max_tokens=2)
    r = httpx.post(live.url + "/adapters", json={"name": "c", "path": "c"}, headers=AUTH)
    assert r.status_code == 201 and r.json()["id"] == "c"
    assert "c" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="c", prompt="Hi", max_tokens=4, temperature=0)
    base = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    assert out.choices[0].text != base.choices[0].text
    assert httpx.post(live.url + "/adapters", json={"name": "c", "path": "c"}, headers=AUTH).status_code == 409
    r = httpx.delete(live.url + "/adapters/c", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert "c" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="Hi", max_tokens=2)
    assert httpx.delete(live.url + "/adapters/c", headers=AUTH).status_code == 404


def test_run_time_adapter_paths_outside_the_root_are_refused(live, tmp_path):
    for path in ("/etc", "../", "c/../../x", str(tmp_path)):
        r = httpx.post(live.url + "/adapters", json={"name": "evil", "path": path}, headers=AUTH)
        assert r.status_code == 403, path
        assert r.json()["error"]["code"] == "adapter_path_forbidden"
    assert httpx.post(live.url + "/adapters", json={"name": "evil", "path": "nope"}, headers=AUTH).status_code == 400


def assert_error(r: httpx.Response, status: int, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "a", "prompt": 5}, 400, "prompt"),
    ({"model": "a", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "a", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "a", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a", "prompt": [10 ** 9]}, 400, "prompt"),
    ({"model": "a", "prompt": ""}, 400, "prompt"),
    ({"model": "a", "prompt": "hi", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop"),
    ({"model": "a", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "a", "prompt": "hi", "max_tokens": 10 ** 6}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(live, client, body, status, param):
    kwargs = {"content": body, "headers": AUTH | {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}
    assert_error(httpx.post(live.url + "/completions", **kwargs), status, param)
    ok = client.completions.create(model="a", prompt="Hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_bad_chat_requests(live, client):
    for body, param in (({"model": "a", "messages": []}, "messages"),
                        ({"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
                        ({"model": "a", "messages": CHAT, "tools": [{"type": "function"}]}, "tools.0")):
        assert_error(httpx.post(live.url + "/chat/completions", json=body, headers=AUTH), 400, param)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=CHAT, max_tokens=10 ** 6)
    assert client.chat.completions.create(model="a", messages=CHAT, max_tokens=2).choices


def test_every_route_but_health_needs_the_key(live):
    routes = [("GET", "/v1/models"), ("GET", "/v1/models/a"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"), ("GET", "/v1/adapters"),
              ("DELETE", "/v1/adapters/a"), ("GET", "/v1/usage"), ("GET", "/metrics")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, live.root + path, headers=headers, json={"model": "a", "prompt": "x"})
            assert_error(r, 401)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(live.root + "/health").json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url, api_key="wrong", max_retries=0).models.list()
    assert "a" in [m["id"] for m in httpx.get(live.url + "/models", headers=AUTH).json()["data"]]


def test_usage_and_metrics_count_tokens(live, client):
    before = httpx.get(live.url + "/usage", headers=AUTH).json()
    r = client.completions.create(model="b", prompt="Count me", max_tokens=3, temperature=0)
    after = httpx.get(live.url + "/usage", headers=AUTH).json()
    old = before["by_model"].get("b", {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0})
    new = after["by_model"]["b"]
    assert new["prompt_tokens"] - old["prompt_tokens"] == r.usage.prompt_tokens
    assert new["completion_tokens"] - old["completion_tokens"] == r.usage.completion_tokens
    assert new["requests"] == old["requests"] + 1
    (key_id, row), = after["by_api_key"].items()
    assert key_id.startswith("key-") and KEY not in key_id
    assert row["total_tokens"] == sum(m["total_tokens"] for m in after["by_model"].values())
    text = httpx.get(live.root + "/metrics", headers=AUTH).text
    for series in ("qforge_requests_total{", "qforge_completion_tokens_total{model=\"b\"}", "qforge_queue_depth ",
                   "qforge_batch_size_bucket{", "qforge_request_latency_seconds_bucket{", "qforge_step_seconds_count{",
                   "qforge_time_to_first_token_seconds_sum "):
        assert series in text, series


@pytest.fixture
def narrow(tokenizer):
    """A server that runs one request at a time and queues one more. Its forward passes take 10 ms
    more, so a 200-token request is surely still running while a test acts, and wait while `gate`
    is clear (`entered` is set once a forward is waiting or running)."""
    model = tiny_llama(tokenizer, seed=3)
    forward, gate, entered = model.forward, threading.Event(), threading.Event()
    gate.set()

    @functools.wraps(forward)
    def slow_forward(*args, **kwargs):
        entered.set()
        gate.wait(60)
        time.sleep(0.01)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    registry = AdapterRegistry(model, "tiny")
    engine = Engine(model, tokenizer, registry, max_batch=1, max_queue=1)
    with LiveServer(create_app(engine, registry)) as server:
        server.engine, server.gate, server.entered = engine, gate, entered
        yield server
        gate.set()
    engine.stop()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def long_body(stream=False):
    return {"model": "tiny", "prompt": "Go on", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def test_full_queue_answers_429_with_retry_after(narrow):
    url, short = narrow.url + "/completions", {"model": "tiny", "prompt": "Go on", "max_tokens": 5}
    narrow.gate.clear()  # the engine stalls in its first forward: one request running, one queued
    running = threading.Thread(target=httpx.post, args=(url,), kwargs={"json": short, "timeout": 60})
    running.start()
    wait_until(narrow.entered.is_set)
    queued = threading.Thread(target=httpx.post, args=(url,), kwargs={"json": short, "timeout": 60})
    queued.start()
    wait_until(lambda: narrow.engine.queue_depth() == 1)
    r = httpx.post(url, json=short, timeout=60)
    assert_error(r, 429)
    assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    narrow.gate.set()
    running.join(60)
    queued.join(60)
    ok = openai.OpenAI(base_url=narrow.url, api_key="none").completions.create(model="tiny", prompt="x", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def generated_tokens(server) -> int:
    return httpx.get(server.url + "/usage").json()["by_model"]["tiny"]["completion_tokens"]


def test_a_client_gone_mid_stream_frees_its_slot(narrow):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", narrow.url + "/completions", json=long_body(stream=True)) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            wait_until(lambda: narrow.engine.running() == 1)
        wait_until(lambda: narrow.engine.running() == 0)
        r = http.post(narrow.url + "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert generated_tokens(narrow) < 100  # the abandoned request stopped early (it asked for 200)


def test_a_client_gone_before_a_plain_answer_frees_its_slot(narrow):
    def give_up():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(narrow.url + "/completions", json=long_body(), timeout=0.5)

    thread = threading.Thread(target=give_up)
    thread.start()
    wait_until(lambda: narrow.engine.running() == 1)
    thread.join()
    wait_until(lambda: narrow.engine.running() == 0)
    r = httpx.post(narrow.url + "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    assert generated_tokens(narrow) < 100 + 3


def test_oversized_bodies_are_refused_unread(live, client):
    r = httpx.post(live.url + "/completions", content=b" " * (9 * 2 ** 20), headers=AUTH)
    assert_error(r, 413)
    assert client.completions.create(model="a", prompt="Hi", max_tokens=1).choices
