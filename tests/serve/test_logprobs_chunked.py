"""Echo log-probs computed a chunk of positions at a time equal the whole-prompt computation:
the pure function against prompt_logprobs on the full logits, and the engine at a tiny chunk
against the same engine scoring the prompt in one chunk (both against transformers elsewhere)."""
import threading

import pytest
import torch

from qforge.serve import Request, SamplingParams
from qforge.serve.logprobs import chunked_prompt_logprobs, prompt_logprobs

ROUNDING = 1e-5  # float32 log-softmax of logits of magnitude ~10: a few ulps; chunking changes no math


def assert_same(a, b):
    assert a[0] is None and b[0] is None and len(a) == len(b)
    for x, y in zip(a[1:], b[1:]):
        assert x.token == y.token and abs(x.logprob - y.logprob) <= ROUNDING
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
        assert max(abs(u - v) for (_, u), (_, v) in zip(x.top, y.top)) <= ROUNDING


@pytest.mark.parametrize("chunk", [1, 5, 256, 10_000])
def test_chunked_equals_whole_prompt(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen)                      # (P, H)
    head = torch.nn.Linear(16, 300, bias=False)
    torch.nn.init.normal_(head.weight, std=0.5, generator=gen)
    ids = torch.randint(0, 300, (37,), generator=gen).tolist()
    with torch.no_grad():
        whole = prompt_logprobs(head(hidden), ids, 4)
        seen = []
        chunked = chunked_prompt_logprobs(hidden, ids, 4, lambda h: seen.append(len(h)) or head(h), chunk)
    assert_same(chunked, whole)
    assert max(seen) == min(chunk, 36) and sum(seen) == 36  # at most `chunk` positions' logits at once


def test_chunked_refuses_a_zero_chunk():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_prompt_logprobs(torch.zeros(3, 2), [1, 2, 3], 0, lambda h: h, 0)


def echo(engine, ids, adapter):
    done = threading.Event()
    req = Request(ids, adapter, SamplingParams(max_tokens=0, logprobs=3, prompt_logprobs=True),
                  sink=lambda e: done.set() if e.kind in ("done", "error") else None)
    engine.submit(req)
    assert done.wait(60)
    return req.prompt_logprobs


def test_engine_chunks_equal_one_chunk(tiny, prompts):
    long = sum(prompts, [])  # every prompt in one: longer than a few chunks of 3
    try:
        for adapter in (None, "b"):
            tiny.logprob_chunk = 3
            small = echo(tiny, long, adapter)
            tiny.logprob_chunk = 10_000
            assert_same(small, echo(tiny, long, adapter))
    finally:
        tiny.logprob_chunk = 256


@torch.no_grad()
def test_a_family_that_scales_its_logits_is_scored_as_its_forward_scores(tokenizer):
    """Granite divides lm_head's output by logits_scaling: echo log-probs from the hidden states
    must do the same (against the model's own log-softmax)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from qforge.model.serving import dense_targets
    from qforge.serve import AdapterRegistry, Engine

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0,
                           max_position_embeddings=128, initializer_range=0.2)
    model = GraniteForCausalLM(config).eval()
    ids = tokenizer("The capital of France is Paris").input_ids
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    dense_targets(model, torch.float32)
    engine = Engine(model, tokenizer, AdapterRegistry(model, "granite"), max_batch=2).start()
    try:
        got = echo(engine, ids, None)
    finally:
        engine.stop()
    for i in range(1, len(ids)):
        assert abs(got[i].logprob - float(logp[i - 1, ids[i]])) < 1e-4
