"""A bounded load test: 8 concurrent clients for 6 seconds on loopback, mixing models, streaming and
plain requests. Every answer must be complete and no request may get a 5xx."""
import json
import random
import threading
import time

import httpx
import pytest

from qforge.serve import AdapterRegistry, Engine
from qforge.serve.api import create_app

from .helpers import LiveServer, save_random_adapters, tiny_llama

CLIENTS, SECONDS = 8, 6.0


@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=4)
    save_random_adapters(model, root, ["a", "b", "c"])
    registry = AdapterRegistry(model, "tiny", max_loaded=2, adapter_root=root)  # 3 adapters, 2 slots: reloads
    for name in "abc":
        registry.add(name, name)
    engine = Engine(model, tokenizer, registry, max_batch=4, max_queue=8)
    with LiveServer(create_app(engine, registry)) as live:
        live.engine = engine
        yield live
    engine.stop()


def one_request(http: httpx.Client, url: str, rng: random.Random) -> tuple[int, str]:
    """Returns (status, problem or ""): a 200 must be a complete answer."""
    model, stream, n = rng.choice(["tiny", "a", "b", "c"]), rng.random() < 0.5, rng.randint(1, 24)
    body = {"model": model, "max_tokens": n, "temperature": rng.choice([0, 0.8]), "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
            "messages": [{"role": "user", "content": rng.choice(["hi", "tell me a story", "2+2?"])}]}
    if not stream:
        r = http.post(url, json=body)
        if r.status_code != 200:
            return r.status_code, ""
        out = r.json()
        ok = out["choices"][0]["finish_reason"] in ("stop", "length") and 1 <= out["usage"]["completion_tokens"] <= n
        return 200, "" if ok else f"incomplete: {out}"
    with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, ""
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    ok = events[-1] == "[DONE]" and len(finish) == 1 and 1 <= chunks[-1]["usage"]["completion_tokens"] <= n
    return 200, "" if ok else f"incomplete stream: {events[-3:]}"


def test_bounded_load_has_no_5xx_and_complete_answers(server):
    statuses, problems, lock = [], [], threading.Lock()
    deadline = time.monotonic() + SECONDS

    def client(seed):
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                status, problem = one_request(http, server.url + "/chat/completions", rng)
                with lock:
                    statuses.append(status)
                    if problem:
                        problems.append(problem)
                if status == 429:
                    time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    print(f"{len(statuses)} requests: {statuses.count(200)} answered, {statuses.count(429)} told to retry (429)")
    assert statuses.count(200) >= CLIENTS and not problems, problems[:3]
    assert set(statuses) <= {200, 429} and not [s for s in statuses if s >= 500]
    assert httpx.get(server.root + "/health").json() == {"status": "ok", "queue_depth": 0, "running": 0,
                                                          "loaded_adapters": 2}
