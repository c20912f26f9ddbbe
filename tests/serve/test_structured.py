"""Structured outputs on a tiny random model (whose free text is noise, so only the grammar makes it
JSON): response_format json_schema per row of a batch mixing adapters and schemas, every output
parsing and validating; forced tool calls constrained to the tool's parameters; tool calls parsed
from text under tool_choice auto; bad schemas and tool specs are 400s."""
import json
import threading

import httpx
import jsonschema
import openai
import pytest

from qforge.serve import AdapterRegistry, Engine
from qforge.serve.api import create_app
from qforge.serve.tools import OutputPlan, render_messages

from .helpers import LiveServer, save_random_adapters, tiny_llama

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "role"], "additionalProperties": False}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                          "ok": {"type": "boolean"},
                                          "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
         "required": ["x", "ok", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "unit": {"enum": ["c", "f"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Tell me about someone."}]


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=5, context=1024)
    save_random_adapters(model, root, ["a", "b"])
    registry = AdapterRegistry(model, "tiny", adapter_root=root)
    for name in "ab":
        registry.add(name, root / name, trusted=True)
    engine = Engine(model, tokenizer, registry, max_batch=8)
    with LiveServer(create_app(engine, registry)) as server:
        server.engine = engine
        yield server
    engine.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url, api_key="x", max_retries=0, timeout=120)


def schema_format(schema, name="s"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schema_per_row_of_a_mixed_batch(client, live):
    jobs = [(model, schema, temperature) for model in ("tiny", "a", "b") for schema in (PERSON, POINT)
            for temperature in (0, 1.0)]
    results = [None] * len(jobs)

    def ask(i, model, schema, temperature):
        results[i] = client.chat.completions.create(model=model, messages=ASK, max_tokens=80, temperature=temperature,
                                                    seed=i, response_format=schema_format(schema))
    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = set()
    for (model, schema, _), r in zip(jobs, results):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (model, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
        texts.add(choice.message.content)
    assert len(texts) > 4  # the rows really differ (adapters, schemas, sampling)
    free = client.chat.completions.create(model="a", messages=ASK, max_tokens=20, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content)  # without the grammar this model writes noise


def test_json_object_and_completions_extension(client):
    r = client.chat.completions.create(model="b", messages=ASK, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an unbounded object may run to max_tokens; what came is still a valid prefix of an object
        assert r.choices[0].message.content.startswith("{")
    c = client.completions.create(model="a", prompt="Data:", max_tokens=80, temperature=0,
                                  extra_body={"response_format": schema_format(POINT)})
    jsonschema.validate(json.loads(c.choices[0].text), POINT)


def test_forced_tool_call_validates_against_the_tool_schema(client):
    for model in ("tiny", "a"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                           tools=[WEATHER, CLOCK], max_tokens=80, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    r = client.chat.completions.create(model="b", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                                       max_tokens=80, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    chunks = list(client.chat.completions.create(model="b", messages=ASK, tools=[WEATHER, CLOCK],
                                                 tool_choice="required", max_tokens=80, temperature=0, stream=True))
    streamed = [tc for c in chunks for ch in c.choices if ch.delta.tool_calls for tc in ch.delta.tool_calls]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [(call.function.name,
                                                                            call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_calls_are_parsed_from_text_and_history_renders():
    plan = OutputPlan(tools=[WEATHER])
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    message, called = plan.message(text)
    assert called and message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                "arguments": '{"city": "Oslo", "unit": "c"}'}
    assert plan.message('<tool_call>{"name": "nope", "arguments": {}}</tool_call>') == (
        {"role": "assistant", "content": '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'}, False)
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
               {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}]
    rendered = render_messages(history, [WEATHER], native=False)
    assert rendered[0]["role"] == "system" and '"get_weather"' in rendered[0]["content"]
    assert '"arguments": {"city": "Oslo", "unit": "c"}' in rendered[2]["content"]
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>"}


def test_a_conversation_with_tool_results_is_served(client):
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
                {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}]
    r = client.chat.completions.create(model="a", messages=messages, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}},
     "response_format.json_schema"),
    ({"response_format": schema_format({"type": "object", "properties": {"a": {"type": "wizard"}}})},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_structured_requests_are_400(live, extra, param):
    r = httpx.post(live.url + "/chat/completions", json={"model": "a", "messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_failing_grammar_fails_its_own_row_only(tiny, prompts):
    from qforge.serve import Request, SamplingParams

    class Broken:
        def mask(self, logits):
            raise RuntimeError("grammar broke")

        def advance(self, token):
            pass

    done = threading.Semaphore(0)
    sink = lambda e: done.release() if e.kind != "delta" else None  # noqa: E731
    bad = Request(prompts[0], "a", SamplingParams(max_tokens=3, temperature=0), sink=sink, processor=Broken())
    good = Request(prompts[1], "b", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), sink=sink)
    tiny.submit(bad, good)
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert bad.finish_reason == "error" and "grammar broke" in bad.text
    assert good.finish_reason == "length" and len(good.output_ids) == 3
