"""An adapter trained with --chat-template carries its template in its tokenizer files; chat requests
for that adapter are rendered with it, requests for the base with the base tokenizer's own."""
import copy

import openai
import pytest

from qforge.adapters import save_adapter
from qforge.serve import AdapterRegistry, Engine, Metrics
from qforge.serve.api import create_app
from qforge.serve.registry import detach_adapter
from qforge.model.templates import apply_chat_template

from .helpers import LiveServer, random_adapter, tiny_llama

CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("templated")
    model = tiny_llama(tokenizer, seed=3)
    phi3 = copy.deepcopy(tokenizer)
    apply_chat_template(phi3, "phi3")
    for name, tok in (("templated", phi3), ("plain", None)):
        random_adapter(model, name, seed=7)
        save_adapter(model, root / name, name=name, tokenizer=tok)
        detach_adapter(model, name)
    metrics = Metrics()
    registry = AdapterRegistry(model, "tiny", max_loaded=4, adapter_root=root, metrics=metrics)
    for name in ("templated", "plain"):
        registry.add(name, root / name, trusted=True)
    engine = Engine(model, tokenizer, registry, max_batch=4, metrics=metrics)
    with LiveServer(create_app(engine, registry, api_keys=[], metrics=metrics)) as server:
        yield openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60), phi3
    engine.stop()


def prompt_tokens(tok, messages):
    return len(tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids)


def test_chat_uses_the_template_saved_with_the_adapter(client, tokenizer):
    api, phi3 = client
    assert prompt_tokens(phi3, CHAT) != prompt_tokens(tokenizer, CHAT)
    for model, tok in (("templated", phi3), ("plain", tokenizer), ("tiny", tokenizer)):
        r = api.chat.completions.create(model=model, messages=CHAT, max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens == prompt_tokens(tok, CHAT), model
