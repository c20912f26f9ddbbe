"""Serving adapters on an HQQ base: a mixed batch over a 3-bit HQQ model gives each row the greedy
tokens of that request alone."""
from qforge.model.surgery import hqq_layers
from qforge.serve import AdapterRegistry, Engine, SamplingParams
from tests.fixtures import quantize_all, tiny_llama, vocab_of

from .helpers import greedy_alone, random_adapter
from .test_engine import GREEDY, run_all


def test_mixed_batch_on_an_hqq_base_equals_each_request_alone(tokenizer, prompts):
    model = tiny_llama(tied=True, max_position_embeddings=256, initializer_range=0.1, **vocab_of(tokenizer, "eos"))
    quantize_all(model, "hqq3", 64)
    assert len(list(hqq_layers(model))) == 14
    model.eval()
    for i, name in enumerate(("a", "b")):
        random_adapter(model, name, seed=i)
    registry = AdapterRegistry(model, "tiny-hqq")
    for name in ("a", "b"):
        registry.attach(name)
    engine = Engine(model, tokenizer, registry, max_batch=4).start()
    try:
        jobs = [(p, (None, "a", "b")[i % 3], SamplingParams(max_tokens=5, **GREEDY)) for i, p in enumerate(prompts)]
        for req, (prompt, adapter, params) in zip(run_all(engine, jobs), jobs):
            assert req.output_ids == greedy_alone(engine.model, prompt, adapter, 5), adapter
    finally:
        engine.stop()
