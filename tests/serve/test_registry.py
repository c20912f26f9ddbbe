"""Adapters by name: PEFT folders loaded on demand, an LRU of resident ones, and the adapter root."""
import json
import os
import threading

import pytest

from qforge.serve import AdapterRegistry, Engine, SamplingParams
from qforge.serve.registry import AdapterConflict, AdapterError, AdapterForbidden, AdapterNotFound

from .helpers import greedy_alone, save_random_adapters, tiny_llama

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A tiny model and a root holding PEFT folders a, b, c (random, non-zero B)."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=1)
    save_random_adapters(model, root, ["a", "b", "c"])
    return model, root


def attached(registry) -> set[str]:
    """The adapters that occupy the model's serving slots."""
    return set(registry.slots.loaded())


def test_lru_evicts_the_least_recently_used_and_reloads_on_demand(saved, tokenizer, prompts):
    model, root = saved
    registry = AdapterRegistry(model, "tiny", max_loaded=2, adapter_root=root)
    try:
        for name in "abc":
            registry.add(name, name)  # loading c evicts a
        assert registry.loaded_names() == ["b", "c"] and attached(registry) == {"b", "c"}
        engine = Engine(model, tokenizer, registry).start()
        try:
            out = engine.generate(prompts[3], "a", GREEDY, timeout=30)  # reload a, evict b
            assert set(registry.loaded_names()) == {"a", "c"} and attached(registry) == {"a", "c"}
            assert out.output_ids == greedy_alone(model, prompts[3], "a", 6)
            assert registry.names() == ["a", "b", "c"]  # evicted is not forgotten
        finally:
            engine.stop()
    finally:
        for name in registry.names():
            registry.remove(name)
    assert attached(registry) == set()


def test_pinned_adapters_are_never_evicted(saved):
    model, root = saved
    registry = AdapterRegistry(model, "tiny", max_loaded=2, adapter_root=root)
    try:
        registry.add("a", "a")
        registry.add("b", "b")
        assert registry.acquire("a") and registry.acquire("b")
        with pytest.raises(AdapterError, match="slots are held"):
            registry.add("c", "c")
        assert "c" not in registry
        registry.release("a")
        registry.add("c", "c")
        assert set(registry.loaded_names()) == {"b", "c"}
        registry.remove("b")  # in use: detached only when released
        assert "b" in attached(registry) and "b" not in registry
        registry.release("b")
        assert "b" not in attached(registry)
    finally:
        for name in registry.names():
            registry.remove(name)


def test_requests_wait_for_an_adapter_slot(saved, tokenizer, prompts):
    model, root = saved
    registry = AdapterRegistry(model, "tiny", max_loaded=1, adapter_root=root)
    engine = Engine(model, tokenizer, registry, max_batch=4).start()
    try:
        expected = {}
        for name in "ab":
            registry.add(name, name)  # b's load evicts a
            expected[name] = greedy_alone(model, prompts[1], name, 6)
        results = {}

        def ask(i, name):
            results[i] = engine.generate(prompts[1], name, GREEDY, timeout=60).output_ids

        threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate("abab")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(4)] == [expected[n] for n in "abab"]
        assert len(registry.loaded_names()) == 1
    finally:
        engine.stop()
        for name in registry.names():
            registry.remove(name)


def test_adapter_paths_must_stay_inside_the_root(saved, tmp_path):
    model, root = saved
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text((root / "a" / "adapter_config.json").read_text())
    registry = AdapterRegistry(model, "tiny", adapter_root=root)
    escape = root / "escape"
    escape.symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"  # a folder inside the root whose weights file points outside it
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((root / "a" / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_config.json")
    try:
        for path in (str(outside), "../outside", "a/../../outside", "escape", "/etc", "sneaky"):
            with pytest.raises(AdapterForbidden):
                registry.add("x", path)
        with pytest.raises(AdapterError, match="no adapter folder"):
            registry.add("x", "missing")
        assert registry.names() == [] and attached(registry) == set()
        registry.add("x", str(root / "a"))  # absolute but inside: fine
        assert registry.names() == ["x"]
    finally:
        escape.unlink()
        for name in registry.names():
            registry.remove(name)
    with pytest.raises(AdapterForbidden, match="--adapter-root"):
        AdapterRegistry(model, "tiny").add("x", str(root / "a"))


def test_bad_names_and_broken_folders_are_refused(saved, tmp_path):
    model, root = saved
    registry = AdapterRegistry(model, "tiny", adapter_root=root)
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    try:
        for name in ("", "has.dot", "-lead", "x" * 200, "tiny"):
            with pytest.raises(AdapterError):
                registry.add(name, "a")
        registry.add("a", "a")
        with pytest.raises(AdapterConflict):
            registry.add("a", "b")
        with pytest.raises(AdapterError, match="not valid JSON") as info:
            registry.add("broken", "broken")
        assert str(root) not in str(info.value)  # server paths are not echoed
        config = json.loads((root / "a" / "adapter_config.json").read_text())
        wrong = root / "wrong_model"
        wrong.mkdir(exist_ok=True)
        (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
        os.link(root / "a" / "adapter_model.safetensors", wrong / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match="shape"):
            registry.add("wrong", "wrong_model")
        assert registry.names() == ["a"]
        with pytest.raises(AdapterNotFound):
            registry.remove("nope")
    finally:
        for name in registry.names():
            registry.remove(name)
