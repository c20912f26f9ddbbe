"""Log-probabilities against the transformers model's own log-softmax on the same tokens (float32,
1e-4): in the engine with a different adapter per row of one batch, and over HTTP in OpenAI's legacy
completion shape (`logprobs`, `echo`, `max_tokens: 0`) and chat shape (`logprobs`, `top_logprobs`),
streaming included, through the official openai client."""
import threading

import openai
import pytest
import torch

from qforge.model.surgery import set_active_adapter
from qforge.serve import AdapterRegistry, Engine, Metrics, Request, SamplingParams
from qforge.serve.api import create_app
from qforge.serve.logprobs import token_bytes

from .helpers import LiveServer, alone_model, save_random_adapters, tiny_llama

TOL = 1e-4


@torch.no_grad()
def oracle(model, ids: list[int], adapter: str | None, lock=None) -> torch.Tensor:
    """(T, V) float32 log-softmax of the model's logits over `ids`, batch 1, the adapter active."""
    model = alone_model(model, adapter)  # a folder's adapter: loaded in-process on a copy (no slots)
    with lock or threading.RLock():
        set_active_adapter(model, adapter)
        try:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        finally:
            set_active_adapter(model, None)
    return torch.log_softmax(logits, -1)


def assert_entry(entry, logp_row: torch.Tensor, token: int, k: int):
    assert entry.token == token
    assert abs(entry.logprob - float(logp_row[token])) < TOL
    values, index = logp_row.topk(k)
    assert [t for t, _ in entry.top] == index.tolist()
    assert torch.allclose(torch.tensor([v for _, v in entry.top]), values, atol=TOL)


def test_engine_logprobs_per_row_of_a_mixed_batch(tiny, prompts):
    done = threading.Semaphore(0)
    jobs = [(p, a) for p in prompts for a in (None, "a", "b", "c")]
    reqs = [Request(p, a, SamplingParams(max_tokens=4, temperature=0.8, seed=i, ignore_eos=True, logprobs=3,
                                         prompt_logprobs=(i % 2 == 0)),
                    sink=lambda e: done.release() if e.kind != "delta" else None) for i, (p, a) in enumerate(jobs)]
    tiny.submit(*reqs)
    for _ in reqs:
        assert done.acquire(timeout=60)
    for req in reqs:
        full = req.prompt_ids + req.output_ids
        logp = oracle(tiny.model, full, req.adapter, tiny.registry.lock)  # (T, V)
        n = len(req.prompt_ids)
        assert len(req.output_logprobs) == 4
        for j, entry in enumerate(req.output_logprobs):
            assert_entry(entry, logp[n - 1 + j], full[n + j], 3)
        if req.params.prompt_logprobs:
            assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == n
            for i in range(1, n):
                assert_entry(req.prompt_logprobs[i], logp[i - 1], full[i], 3)
        else:
            assert req.prompt_logprobs is None


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=3)
    save_random_adapters(model, root, ["a", "b"])
    metrics = Metrics()
    registry = AdapterRegistry(model, "tiny", max_loaded=4, adapter_root=root, metrics=metrics)
    for name in "ab":
        registry.add(name, root / name, trusted=True)
    engine = Engine(model, tokenizer, registry, max_batch=8, metrics=metrics)
    with LiveServer(create_app(engine, registry, metrics=metrics)) as server:
        server.engine, server.model = engine, model
        yield server
    engine.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url, api_key="none", max_retries=0, timeout=60)


def check_legacy(tokenizer, logprobs, ids, logp, k, first_scored: bool):
    """A legacy logprobs object for tokens `ids` against the oracle rows logp (T, V)."""
    assert logprobs.tokens == [token_bytes(tokenizer, t).decode("utf-8", "replace") for t in ids]
    offsets = [0]
    for t in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert logprobs.text_offset == offsets
    for i, tok in enumerate(ids):
        if i == 0 and not first_scored:
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            continue
        row = logp[i - 1]
        assert abs(logprobs.token_logprobs[i] - float(row[tok])) < TOL
        values, index = row.topk(k)
        top = logprobs.top_logprobs[i]
        assert len(top) <= k and max(top.values()) == pytest.approx(float(values[0]), abs=TOL)
        for t, v in zip(index.tolist(), values.tolist()):
            name = token_bytes(tokenizer, t).decode("utf-8", "replace")
            assert abs(top[name] - v) < TOL or top[name] > v  # two tokens may share a text: the best is kept


def test_echo_with_max_tokens_zero_scores_the_prompt(client, live, tokenizer):
    text = "The capital of France is Paris"
    ids = tokenizer(text).input_ids
    r = client.completions.create(model="a", prompt=text, max_tokens=0, echo=True, logprobs=5)
    c = r.choices[0]
    assert c.text == tokenizer.decode(ids) and r.usage.completion_tokens == 0
    check_legacy(tokenizer, c.logprobs, ids, oracle(live.model, ids, "a", live.engine.registry.lock), 5, False)


def test_lm_eval_style_request_on_token_ids(client, live, tokenizer):
    """What lm-eval's local-completions sends for log-likelihood: token ids, echo, logprobs 1, max_tokens 1."""
    prompts = [tokenizer(t).input_ids for t in ("Hello there, how", "One two three four")]
    r = client.completions.create(model="b", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    for c, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts):
        logp = oracle(live.model, ids, "b", live.engine.registry.lock)
        new = int(logp[-1].argmax())
        assert len(c.logprobs.token_logprobs) == len(ids) + 1
        full = oracle(live.model, ids + [new], "b", live.engine.registry.lock)
        check_legacy(tokenizer, c.logprobs, ids + [new], full, 1, False)


def test_completion_logprobs_mixed_adapters_in_one_batch(client, live, tokenizer):
    text = "Once upon a time"
    ids = tokenizer(text).input_ids
    results = {}

    def ask(model):
        results[model] = client.completions.create(model=model, prompt=text, max_tokens=5, temperature=0,
                                                   logprobs=4, extra_body={"ignore_eos": True})
    threads = [threading.Thread(target=ask, args=(m,)) for m in ("tiny", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model, r in results.items():
        adapter = None if model == "tiny" else model
        lp = r.choices[0].logprobs
        # the greedy path, step by step by the oracle: each token's log-prob as served
        seq = list(ids)
        for i in range(5):
            logp = oracle(live.model, seq, adapter, live.engine.registry.lock)[-1]
            tok = int(logp.argmax())
            assert abs(lp.token_logprobs[i] - float(logp[tok])) < TOL
            assert lp.tokens[i] == token_bytes(tokenizer, tok).decode("utf-8", "replace")
            seq.append(tok)
        assert "".join(lp.tokens) == r.choices[0].text


def test_chat_logprobs_and_stream(client, live, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids
    kwargs = dict(model="a", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                  extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    seq = list(prompt)
    for item in content:
        logp = oracle(live.model, seq, "a", live.engine.registry.lock)[-1]
        tok = int(logp.argmax())
        assert bytes(item.bytes) == token_bytes(tokenizer, tok) and abs(item.logprob - float(logp[tok])) < TOL
        values, index = logp.topk(3)
        assert [bytes(t.bytes) for t in item.top_logprobs] == [token_bytes(tokenizer, i) for i in index.tolist()]
        assert all(abs(t.logprob - v) < TOL for t, v in zip(item.top_logprobs, values.tolist()))
        seq.append(tok)
    streamed = [c for chunk in client.chat.completions.create(stream=True, **kwargs) for ch in chunk.choices
                if ch.logprobs is not None for c in ch.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model="a", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_stream_with_echo(client, tokenizer):
    kwargs = dict(model="b", prompt="Hello there", max_tokens=4, temperature=0, logprobs=2, echo=True,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [ch for chunk in client.completions.create(stream=True, **kwargs) for ch in chunk.choices]
    assert "".join(c.text for c in chunks) == whole.text
    lps = [c.logprobs for c in chunks if c.logprobs is not None]
    assert sum((lp.token_logprobs for lp in lps), []) == whole.logprobs.token_logprobs
    assert sum((lp.text_offset for lp in lps), []) == whole.logprobs.text_offset
