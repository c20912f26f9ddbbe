"""Serving adapters on an HQQ base: a mixed batch over a 3-bit HQQ model gives each row the greedy
tokens of that request alone."""
import torch

from qforge.model.surgery import hqq_layers, linear_names, quantize_linears, select_targets
from qforge.serve import AdapterRegistry, Engine, SamplingParams

from .helpers import greedy_alone, random_adapter
from .test_engine import GREEDY, run_all


def test_mixed_batch_on_an_hqq_base_equals_each_request_alone(tokenizer, prompts):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.1, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    quantize_linears(model, select_targets(linear_names(model), "all-linear"), "hqq3", 64, compute_dtype=torch.float32)
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
