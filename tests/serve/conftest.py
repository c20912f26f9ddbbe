import pytest
import torch

from qforge.serve import AdapterRegistry, Engine, Metrics

from .helpers import random_adapter, smollm2_tokenizer, tiny_llama

ADAPTERS = ("a", "b", "c")


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A tiny random 4-bit Llama (float32) with in-process adapters a, b, c, and its running engine."""
    model = tiny_llama(tokenizer)
    for i, name in enumerate(ADAPTERS):
        random_adapter(model, name, seed=i)
    metrics = Metrics()
    registry = AdapterRegistry(model, "tiny", metrics=metrics)
    for name in ADAPTERS:
        registry.attach(name)
    engine = Engine(model, tokenizer, registry, max_batch=8, metrics=metrics).start()
    yield engine
    engine.stop()


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    texts = ["Hello there", "The capital of France is", "x", "Once upon a time, in a land far away, there lived a"]
    return [tokenizer(t).input_ids for t in texts]


def pytest_collection_modifyitems(items):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
