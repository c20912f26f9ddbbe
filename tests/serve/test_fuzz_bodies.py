"""Issue 28, finding 7: property-based fuzzing of every serving endpoint's JSON body (hypothesis).

Each body mixes well-formed fields with hostile values: wrong types, unicode with lone surrogates,
huge integers, NaN and infinities, deep nesting. The property: the server answers every one of
them with a status below 500, and afterwards its listings (/v1/models, /v1/adapters, /v1/usage)
still answer 200. A tiny random model serves; examples are bounded so the file runs in well
under a minute.
"""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qforge.serve import AdapterRegistry, Engine, Metrics
from qforge.serve.api import create_app

from .helpers import LiveServer, save_random_adapters, tiny_llama

KEY = "fuzz-operator-key"
EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    from qforge.serve.auth import ApiKey

    root = tmp_path_factory.mktemp("fuzz-adapters")
    model = tiny_llama(tokenizer, seed=9)
    save_random_adapters(model, root, ["a"])
    registry = AdapterRegistry(model, "tiny", max_loaded=2, adapter_root=root)
    registry.add("a", root / "a", trusted=True)
    engine = Engine(model, tokenizer, registry, max_batch=4, max_queue=64, context_len=128, metrics=Metrics())
    app = create_app(engine, registry, api_keys=[ApiKey(KEY, "operator", "ops")])
    with LiveServer(app) as server:
        yield server
    engine.stop()


# ---- hostile values ------------------------------------------------------------------------------
surrogates = st.sampled_from(["\ud800", "a\udfff", "\udc00b"])
texts = st.one_of(st.text(max_size=12), surrogates, st.sampled_from(["", "tiny", "a", "\u2028", "\x00"]))
numbers = st.one_of(st.integers(-3, 300), st.sampled_from([2 ** 63, -2 ** 64, 10 ** 30, 0]),
                    st.floats(allow_nan=True, allow_infinity=True), st.booleans())
leaves = st.one_of(st.none(), texts, numbers)
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(texts, inner, max_size=3)), max_leaves=8)


def deep(depth: int):
    """A JSON value nested `depth` deep; below json.dumps' own recursion limit."""
    value = "x"
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


hostile = st.one_of(values, st.integers(60, 400).map(deep))
# mostly a served model, so that the hostile values reach the code behind the model check
models = st.one_of(st.just("tiny"), st.just("a"), st.just("tiny"), st.sampled_from(["nope", "ft:x:y:z"]), texts)
small = st.one_of(st.integers(0, 8), numbers)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), texts)},
    optional={"content": st.one_of(texts, hostile),
              "tool_calls": st.one_of(hostile, st.lists(st.dictionaries(texts, values, max_size=2), max_size=2),
                                      st.just([{"function": {"name": "f", "arguments": "{}"}}]))}),
    min_size=0, max_size=3)
formats = st.one_of(hostile, st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
                    hostile.map(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}))


def body(required: dict, optional: dict):
    return st.fixed_dictionaries(required, optional=optional)


GENERATION = {"max_tokens": small, "n": small, "temperature": numbers, "top_p": numbers, "stream": leaves,
              "stop": st.one_of(texts, st.lists(texts, max_size=6), hostile), "seed": numbers, "user": texts,
              "logprobs": st.one_of(small, leaves), "response_format": formats}
BODIES = {
    "/v1/completions": body({"model": models, "prompt": st.one_of(texts, st.lists(st.integers(-2, 60000), max_size=6),
                                                                  hostile)},
                            GENERATION | {"echo": leaves}),
    "/v1/chat/completions": body({"model": models, "messages": st.one_of(messages, hostile)},
                                 GENERATION | {"tools": hostile, "tool_choice": hostile, "top_logprobs": small}),
    "/v1/embeddings": body({"model": models, "input": st.one_of(texts, surrogates, st.lists(texts, max_size=4), hostile,
                                                                st.lists(st.integers(-2, 60000), max_size=6))},
                           {"encoding_format": texts, "dimensions": numbers}),
    "/v1/adapters": body({"name": st.one_of(st.just("fuzzed"), st.just("fuzzed"), texts),
                          "path": st.one_of(texts, surrogates, st.sampled_from(["a", "../a", "/etc"]))}, {}),
}


def send(live, path: str, payload) -> httpx.Response:
    text = json.dumps(payload, allow_nan=True)  # NaN / Infinity as careless clients write them
    return httpx.post(live.root + path, content=text, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})


@pytest.mark.slow  # about 20 s of CPU for 240 requests
@pytest.mark.parametrize("path", sorted(BODIES))
def test_no_body_gets_a_5xx(live, path):
    @EXAMPLES
    @given(payload=st.one_of(BODIES[path], BODIES[path], BODIES[path], hostile))
    def check(payload):
        r = send(live, path, payload)
        assert r.status_code < 500, (payload, r.status_code, r.text[:300])
        if r.status_code == 201 and path == "/v1/adapters":  # keep the registry small
            httpx.delete(live.root + f"/v1/adapters/{payload['name']}", headers={"Authorization": f"Bearer {KEY}"})

    check()
    for listing in ("/v1/models", "/v1/adapters", "/v1/usage", "/health"):
        assert httpx.get(live.root + listing, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
