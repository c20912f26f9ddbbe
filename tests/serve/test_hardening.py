"""Issue 19's serving failures, each as a test: keys with roles and adapter owners (no key takes
another's adapter or reads /metrics without the operator key), bounded request bodies (chunked
too), strict numbers, lone surrogates, never-fitting requests, a 500 that keeps the connection,
tokenising off the event loop, HEAD /health."""
import json
import socket
import threading

import httpx
import pytest

from qforge.serve import AdapterRegistry, Engine, Metrics
from qforge.serve.api import MAX_BODY_BYTES, create_app
from qforge.serve.auth import ApiKey, read_keys_file

from .helpers import LiveServer, save_random_adapters, tiny_llama

OPERATOR, ALICE, BOB = "operator-key-0", "alice-key-000", "bob-key-00000"
KEYS = [ApiKey(OPERATOR, "operator", "ops"), ApiKey(ALICE, "user", "alice"), ApiKey(BOB, "user", "bob")]
MAX_QUEUE = 8


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def _boom(app, state, caller):
    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("a bug")


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=3)
    save_random_adapters(model, root, ["a", "b", "mine"])
    metrics = Metrics()
    registry = AdapterRegistry(model, "tiny", max_loaded=4, adapter_root=root, metrics=metrics)
    registry.add("a", root / "a", trusted=True)  # the operator's, from the command line
    engine = Engine(model, tokenizer, registry, max_batch=4, max_queue=MAX_QUEUE, metrics=metrics)
    app = create_app(engine, registry, api_keys=KEYS, metrics=metrics, extensions=[_boom])
    with LiveServer(app) as server:
        server.engine, server.registry = engine, registry
        yield server
    engine.stop()


def post(live, path, body, key=ALICE, **kw):
    # json.dumps escapes a lone surrogate as \ud800, as a client in another language would send it
    return httpx.post(live.url + path, content=json.dumps(body), headers=auth(key) | {
        "content-type": "application/json"}, timeout=60, **kw)


# ---- 1. owners and roles ------------------------------------------------------------------------
def test_metrics_and_every_keys_usage_are_the_operators(live):
    assert post(live, "/completions", {"model": "a", "prompt": "Hi", "max_tokens": 2}, key=ALICE).status_code == 200
    assert httpx.get(live.root + "/metrics", headers=auth(ALICE)).status_code == 403
    assert "qforge_requests_total" in httpx.get(live.root + "/metrics", headers=auth(OPERATOR)).text
    everyone = httpx.get(live.url + "/usage", headers=auth(OPERATOR)).json()
    assert KEYS[1].id in everyone["by_api_key"]
    bobs = httpx.get(live.url + "/usage", headers=auth(BOB)).json()
    assert bobs["by_api_key"] == {} and bobs["by_model"] == {}  # nothing of alice's shows
    alices = httpx.get(live.url + "/usage", headers=auth(ALICE)).json()
    assert list(alices["by_api_key"]) == [KEYS[1].id] and "a" in alices["by_model"]


def test_a_user_cannot_take_fine_tuned_names_or_another_namespace(live):
    r = post(live, "/adapters", {"name": "ft:tiny:alice:ftjob-0123", "path": "mine"}, key=BOB)
    assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_name_reserved"
    r = post(live, "/adapters", {"name": "ft:tiny:x:ftjob-1", "path": "mine"}, key=OPERATOR)
    assert r.status_code == 403  # not even the operator: only the job service names fine-tuned models
    r = post(live, "/adapters", {"name": "alice:mine", "path": "mine"}, key=BOB)
    assert r.status_code == 403 and "another key" in r.json()["error"]["message"]
    assert "alice:mine" not in live.registry


def test_a_users_adapter_is_its_own(live):
    assert post(live, "/adapters", {"name": "alice:mine", "path": "mine"}, key=ALICE).status_code == 201
    try:
        ids = lambda key: [m["id"] for m in httpx.get(live.url + "/models", headers=auth(key)).json()["data"]]
        assert "alice:mine" in ids(ALICE) and "alice:mine" in ids(OPERATOR) and "alice:mine" not in ids(BOB)
        assert post(live, "/completions", {"model": "alice:mine", "prompt": "Hi", "max_tokens": 2},
                    key=BOB).status_code == 404
        assert httpx.delete(live.url + "/adapters/alice:mine", headers=auth(BOB)).status_code == 404
        assert post(live, "/adapters", {"name": "alice:mine", "path": "b"}, key=BOB).status_code in (403, 409)
        assert post(live, "/completions", {"model": "alice:mine", "prompt": "Hi", "max_tokens": 2},
                    key=ALICE).status_code == 200
    finally:
        assert httpx.delete(live.url + "/adapters/alice:mine", headers=auth(ALICE)).status_code == 200


def test_a_user_cannot_delete_the_operators_adapter(live):
    r = httpx.delete(live.url + "/adapters/a", headers=auth(BOB))
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_owner"
    assert "a" in live.registry


def test_keys_file_gives_roles_and_names_its_bad_lines(tmp_path):
    good = tmp_path / "keys"
    good.write_text("# key role name\nsecret-operator-1 admin ops\n\nsecret-user-0001 user alice\n")
    keys = read_keys_file(good)
    assert [(k.role, k.name) for k in keys] == [("operator", "ops"), ("user", "alice")]
    bad = tmp_path / "bad"
    bad.write_text("secret-operator-1 admin ops\nsecret-user-0001 root alice\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: role must be operator, admin or user"):
        read_keys_file(bad)


# ---- 3. bounded work, strict input --------------------------------------------------------------
def test_a_chunked_body_over_the_limit_is_413(live):
    def chunks():
        block = b" " * 2 ** 20
        for _ in range(MAX_BODY_BYTES // len(block) + 2):
            yield block
    r = httpx.post(live.url + "/chat/completions", content=chunks(), headers=auth(ALICE) | {
        "content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = json.dumps({"model": "a", "prompt": "Hi", "max_tokens": 2}).encode()
    r = httpx.post(live.url + "/completions", content=iter([small[:10], small[10:]]),
                   headers=auth(ALICE) | {"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200  # a chunked body under the limit is read as usual


@pytest.mark.parametrize("change,param", [
    ({"seed": 2 ** 70}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"n": "2"}, "n"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": "bad \ud800 text"}, "prompt"),
    ({"n": MAX_QUEUE + 1}, "n"),
])
def test_bad_numbers_and_text_are_400(live, change, param):
    r = post(live, "/completions", {"model": "a", "prompt": "Hi", "max_tokens": 2} | change)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_a_lone_surrogate_in_chat_content_is_400(live):
    r = post(live, "/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x\ud800"}]})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


def test_a_tiny_top_p_means_the_top_token(live):
    body = {"model": "a", "prompt": "Hi", "max_tokens": 4, "temperature": 1.0, "seed": 2 ** 63 - 1}
    sampled = post(live, "/completions", body | {"top_p": 1e-46})
    greedy = post(live, "/completions", body | {"temperature": 0})
    assert sampled.status_code == 200 and sampled.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_head_health(live):
    assert httpx.head(live.root + "/health").status_code == 200


def _http(sock: socket.socket, path: str) -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("the server closed the connection")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def test_a_500_keeps_the_connection_for_the_next_request(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        status, body = _http(sock, "/v1/boom")
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        status, _ = _http(sock, "/health")  # same connection
        assert status == 200


def test_templating_and_tokenising_run_off_the_event_loop(live, monkeypatch):
    threads = []
    tokenizer = live.engine.tokenizer
    real = type(tokenizer).__call__

    def spy(self, *a, **kw):
        threads.append(threading.current_thread().name)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    assert post(live, "/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 2}).status_code == 200
    assert post(live, "/completions", {"model": "a", "prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert threads and all(t.startswith("qforge-tokenize") for t in threads), threads
