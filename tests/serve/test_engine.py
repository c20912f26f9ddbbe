"""The engine against an oracle: greedy decoding of one prompt alone with its adapter active."""
import threading
import time

import pytest
import torch

from qforge.serve import AdapterRegistry, Engine, QueueFull, Request, RequestError, SamplingParams
from qforge.serve.engine import KVBatch, sample_token

from .helpers import greedy_alone, random_adapter, tiny_llama

GREEDY = dict(temperature=0, ignore_eos=True)


def run_all(engine, jobs, stagger_after=None):
    """Submit (prompt, adapter, params) jobs; with stagger_after=k, the rest join only once the
    first k have produced tokens (so rows join a running batch). Returns the finished requests."""
    done = threading.Semaphore(0)
    reqs = [Request(p, a, params, sink=lambda e: done.release() if e.kind != "delta" else None)
            for p, a, params in jobs]
    first = reqs[:stagger_after] if stagger_after else reqs
    engine.submit(*first)
    if stagger_after:
        while any(len(r.output_ids) < 2 and r.finish_reason is None for r in first):
            time.sleep(0.002)
        engine.submit(*reqs[stagger_after:])
    for _ in reqs:
        assert done.acquire(timeout=60)
    return reqs


def test_mixed_batch_greedy_equals_each_request_alone(tiny, prompts):
    adapters = [None, "a", "b", "c"]
    jobs = [(p, adapters[(i + j) % 4], SamplingParams(max_tokens=4 + 3 * i + j, **GREEDY))
            for i, p in enumerate(prompts) for j in range(4)]
    reqs = run_all(tiny, jobs, stagger_after=6)
    for req, (prompt, adapter, params) in zip(reqs, jobs):
        assert req.output_ids == greedy_alone(tiny.model, prompt, adapter, params.max_tokens), (adapter, params)
        assert req.finish_reason == "length" and len(req.output_ids) == params.max_tokens
    outs = {r.adapter: tuple(r.output_ids[:4]) for r in reqs if r.prompt_ids == prompts[3]}
    assert len(set(outs.values())) == 4  # each adapter really changes the output


def test_rows_join_and_leave_a_running_batch(tiny, prompts):
    before = tiny.metrics.batch_size.count()
    jobs = [(prompts[i % 4], "abc"[i % 3], SamplingParams(max_tokens=2 + 5 * i, **GREEDY)) for i in range(6)]
    reqs = run_all(tiny, jobs, stagger_after=2)
    steps = tiny.metrics.batch_size.count() - before
    assert steps < sum(len(r.output_ids) for r in reqs) / 2  # batched, not one request at a time
    assert all(r.output_ids == greedy_alone(tiny.model, r.prompt_ids, r.adapter, r.params.max_tokens) for r in reqs)
    assert tiny.running() == 0 and tiny._kv.cache is None  # everyone left; the cache is gone


def test_bfloat16_mixed_batch_stays_close_to_alone(tokenizer, prompts):
    model = tiny_llama(tokenizer, dtype=torch.bfloat16)
    for i, name in enumerate("ab"):
        random_adapter(model, name, seed=i, dtype=torch.bfloat16)
    registry = AdapterRegistry(model, "tiny")
    for name in "ab":
        registry.attach(name)
    engine = Engine(model, tokenizer, registry, max_batch=8).start()
    try:
        jobs = [(p, a, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts for a in (None, "a", "b")]
        reqs = run_all(engine, jobs)
    finally:
        engine.stop()
    firsts = [r.output_ids[0] == greedy_alone(model, r.prompt_ids, r.adapter, 1)[0] for r in reqs]
    same = [r.output_ids == greedy_alone(model, r.prompt_ids, r.adapter, 6) for r in reqs]
    assert sum(firsts) >= len(reqs) - 1 and sum(same) >= len(reqs) * 3 // 4, (firsts, same)


def test_engine_on_the_models_device(tokenizer, prompts, device):
    """The model on `device`: the engine, its KV cache and the adapter slots live there too, and a
    mixed batch decodes as each request alone with its adapter active."""
    model = tiny_llama(tokenizer)
    for i, name in enumerate("ab"):
        random_adapter(model, name, seed=i)
    model.to(device)
    registry = AdapterRegistry(model, "tiny")
    for name in "ab":
        registry.attach(name)
    engine = Engine(model, tokenizer, registry, max_batch=4).start()
    seen = []
    real = engine._kv.append
    engine._kv.append = lambda kv: seen.append(kv.cache.layers[0].keys.device) or real(kv)
    try:
        jobs = [(p, a, SamplingParams(max_tokens=5, **GREEDY)) for p in prompts[:2] for a in (None, "a", "b")]
        reqs = run_all(engine, jobs)
    finally:
        engine.stop()
    assert engine.device.type == torch.device(device).type
    assert seen and all(d.type == engine.device.type for d in seen)
    for req in reqs:
        assert req.output_ids == greedy_alone(model, req.prompt_ids, req.adapter, 5), req.adapter


def test_seeded_sampling_is_reproducible(tiny, prompts):
    params = dict(max_tokens=12, temperature=1.0, top_p=0.9, ignore_eos=True)
    first, _, third = run_all(tiny, [(prompts[1], "a", SamplingParams(seed=7, **params)),
                                     (prompts[1], "b", SamplingParams(seed=8, **params)),
                                     (prompts[1], "a", SamplingParams(seed=7, **params))])
    alone = run_all(tiny, [(prompts[1], "a", SamplingParams(seed=7, **params))])[0]
    assert first.output_ids == third.output_ids == alone.output_ids  # same seed and adapter: same tokens
    other = run_all(tiny, [(prompts[1], "a", SamplingParams(seed=9, **params))])[0]
    assert other.output_ids != first.output_ids


def test_sample_token_top_p_and_temperature():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(temperature=0), gen) == 1
    assert {sample_token(logits, SamplingParams(top_p=1e-6), gen) for _ in range(20)} == {1}
    seen = {sample_token(logits, SamplingParams(top_p=0.95, temperature=1.0), gen) for _ in range(300)}
    assert seen == {1, 2, 0}  # the 4th token lies outside the nucleus


def test_stop_string_cuts_the_text(tiny, prompts):
    full = tiny.generate(prompts[3], "a", SamplingParams(max_tokens=10, **GREEDY))
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = tiny.generate(prompts[3], "a", SamplingParams(max_tokens=10, stop=("zzzq", stop), **GREEDY))
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert stop not in cut.text


def test_streamed_deltas_add_up_to_the_text(tiny, prompts):
    deltas, done = [], threading.Event()

    def sink(event):
        if event.kind == "delta":
            deltas.append(event.text)
        else:
            done.set()

    req = Request(prompts[0], "b", SamplingParams(max_tokens=15, stop=("the",), **GREEDY), sink=sink)
    tiny.submit(req)
    assert done.wait(30)
    assert "".join(deltas) == req.text


def test_eos_ends_a_request(tiny, prompts):
    ref = greedy_alone(tiny.model, prompts[2], "c", 6)
    tiny.stop_token_ids.add(ref[2])
    try:
        req = tiny.generate(prompts[2], "c", SamplingParams(max_tokens=6, temperature=0))
    finally:
        tiny.stop_token_ids.discard(ref[2])
    assert req.finish_reason == "stop" and req.output_ids == ref[:3]
    assert req.text == tiny.tokenizer.decode(ref[:2], skip_special_tokens=True)


def test_cancel_frees_the_slot(tokenizer, prompts):
    model = tiny_llama(tokenizer)
    engine = Engine(model, tokenizer, AdapterRegistry(model, "tiny"), max_batch=1).start()
    try:
        long = Request(prompts[0], None, SamplingParams(max_tokens=200, **GREEDY))
        engine.submit(long)
        while not long.output_ids:
            time.sleep(0.002)
        engine.cancel(long)
        short = engine.generate(prompts[1], None, SamplingParams(max_tokens=3, **GREEDY), timeout=30)
        assert short.finish_reason == "length" and long.finish_reason == "cancelled"
        # the finished row leaves the batch at the end of the engine's step, after its "done" event
        deadline = time.monotonic() + 30
        while engine.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(long.output_ids) < 200 and engine.running() == 0
    finally:
        engine.stop()


def test_queue_limit_and_context_limit(tokenizer, prompts):
    model = tiny_llama(tokenizer, context=64)
    engine = Engine(model, tokenizer, AdapterRegistry(model, "tiny"), max_queue=2)  # not started: nothing drains
    engine.submit(Request(prompts[0], None, SamplingParams()), Request(prompts[0], None, SamplingParams()))
    with pytest.raises(QueueFull):
        engine.submit(Request(prompts[0], None, SamplingParams()))
    with pytest.raises(RequestError, match="context is 64"):
        engine.check(Request(prompts[0], None, SamplingParams(max_tokens=64)))
    with pytest.raises(RequestError, match="empty"):
        engine.check(Request([], None, SamplingParams()))


def test_a_failing_forward_fails_its_rows_and_the_engine_goes_on(tokenizer, prompts, monkeypatch):
    model = tiny_llama(tokenizer)
    engine = Engine(model, tokenizer, AdapterRegistry(model, "tiny")).start()
    real, calls = model.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            engine.generate(prompts[0], None, SamplingParams(max_tokens=5, **GREEDY), timeout=30)
        ok = engine.generate(prompts[0], None, SamplingParams(max_tokens=5, **GREEDY), timeout=30)
        assert ok.finish_reason == "length" and engine.alive
    finally:
        engine.stop()


def test_kv_batch_left_padding_bookkeeping():
    from transformers import DynamicCache

    def cache(rows, width):
        c = DynamicCache()
        c.update(torch.arange(rows * width, dtype=torch.float).reshape(rows, 1, width, 1).clone(),
                 torch.zeros(rows, 1, width, 1), 0)
        return c

    kv = KVBatch(cache(2, 3), torch.tensor([3, 1]))
    kv.append(KVBatch(cache(1, 5), torch.tensor([5])))
    assert kv.cache.layers[0].keys.shape == (3, 1, 5, 1)
    assert kv.attention_mask().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    kv.keep([0, 1])  # the 5-long row leaves: two columns are padding everywhere now
    assert kv.cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert kv.attention_mask(extra=1).tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_a_request_stops_on_its_own_end_ids(tiny, prompts):
    """SamplingParams.stop_token_ids (its adapter's template's end of turn) ends that row only."""
    free = run_all(tiny, [(prompts[1], "a", SamplingParams(max_tokens=6, temperature=0))])[0]
    end = free.output_ids[2]
    k = free.output_ids.index(end)  # the first time the row emits it
    jobs = [(prompts[1], "a", SamplingParams(max_tokens=6, temperature=0, stop_token_ids=frozenset([end]))),
            (prompts[1], "a", SamplingParams(max_tokens=6, temperature=0))]
    stopped, other = run_all(tiny, jobs)
    assert stopped.output_ids == free.output_ids[:k + 1] and stopped.finish_reason == "stop"
    assert other.output_ids == free.output_ids


def test_adapter_end_ids_come_from_the_template_saved_with_it(tmp_path, tokenizer):
    from types import SimpleNamespace

    from qforge.serve.api.streaming import adapter_end_ids

    (tmp_path / "chat_template.jinja").write_text("{{ '<|im_start|>' + m + '<|im_end|>' }}")
    entries = [SimpleNamespace(name="ad", path=tmp_path), SimpleNamespace(name="bare", path=tmp_path / "none")]
    by_name = {e.name: e for e in entries}
    state = SimpleNamespace(registry=SimpleNamespace(entries=lambda: entries, entry=by_name.get), tokenizer=tokenizer)
    assert adapter_end_ids(state, "ad") == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert adapter_end_ids(state, "bare") == frozenset() and adapter_end_ids(state, None) == frozenset()
