"""POST /v1/embeddings against the transformers model itself: the mean of the last hidden state over
each input's tokens, from the base and from an adapter, as floats and as base64 (the openai client's
default, which it decodes)."""
import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from qforge.model.surgery import set_active_adapter
from qforge.serve import AdapterRegistry, Engine
from qforge.serve.api import create_app

from .helpers import LiveServer, alone_model, save_random_adapters, tiny_llama


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(tokenizer, seed=4)
    save_random_adapters(model, root, ["a"])
    registry = AdapterRegistry(model, "tiny", adapter_root=root)
    registry.add("a", root / "a", trusted=True)
    engine = Engine(model, tokenizer, registry)
    with LiveServer(create_app(engine, registry)) as server:
        server.engine, server.model = engine, model
        yield server
    engine.stop()


@torch.no_grad()
def oracle(live, text: str, adapter) -> np.ndarray:
    ids = live.engine.tokenizer(text, add_special_tokens=False).input_ids
    model = alone_model(live.model, adapter)  # a folder's adapter: loaded in-process on a copy (no slots)
    with live.engine.registry.lock:
        set_active_adapter(model, adapter)
        try:
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        finally:
            set_active_adapter(model, None)
    return hidden.float().mean(0).numpy()


def test_embeddings_equal_the_mean_hidden_state(live):
    client = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
    texts = ["a short one", "a somewhat longer sentence, so the batch is padded"]
    for model, adapter in (("tiny", None), ("a", "a")):
        r = client.embeddings.create(model=model, input=texts)  # base64 on the wire, decoded by the client
        assert [d.index for d in r.data] == [0, 1] and r.model == model
        for d, text in zip(r.data, texts):
            np.testing.assert_allclose(np.array(d.embedding), oracle(live, text, adapter), atol=1e-5)
        assert r.usage.prompt_tokens == sum(len(live.engine.tokenizer(t, add_special_tokens=False).input_ids)
                                            for t in texts)
    floats = client.embeddings.create(model="a", input=texts[0], encoding_format="float").data[0].embedding
    np.testing.assert_allclose(floats, oracle(live, texts[0], "a"), atol=1e-5)
    raw = httpx.post(live.url + "/embeddings", json={"model": "a", "input": texts[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, atol=0)
    assert not np.allclose(oracle(live, texts[0], None), oracle(live, texts[0], "a"), atol=1e-3)


def test_bad_embedding_requests(live):
    for body, status in (({"model": "tiny", "input": ""}, 400), ({"model": "tiny", "input": []}, 400),
                         ({"model": "nope", "input": "x"}, 404), ({"model": "tiny", "input": [10 ** 9]}, 400),
                         ({"model": "tiny", "input": "x", "encoding_format": "int8"}, 400)):
        r = httpx.post(live.url + "/embeddings", json=body)
        assert r.status_code == status and r.json()["error"]["message"], body
