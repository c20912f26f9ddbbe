"""The embedded SmolLM2-135M-Instruct, saved as a float32 folder, served with `--quant-type none`:
echo log-probs equal transformers' log-softmax on that folder (1e-4), and lm-eval's
`local-completions` through the server gives exactly lm-eval `hf`'s numbers on that folder
(a handful of documents of qforge's offline multiple-choice task)."""
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from qforge.app import ServeConfig, build_server
from qforge.eval import harness
from qforge.model.load import smollm2_folder

from .helpers import LiveServer

pytestmark = pytest.mark.slow
TEXT = "Paris is the capital of France. The Eiffel Tower was finished in 1889 for the World's Fair."
DOCS = 12


@pytest.fixture(scope="module")
def served():
    app, engine = build_server(ServeConfig(base="smollm2", quant_type="none", dtype="float32", max_batch=4))
    yield app, engine
    engine.stop()


@torch.no_grad()
def test_echo_logprobs_equal_transformers_on_the_float32_folder(served):
    app, engine = served
    ids = engine.tokenizer(TEXT, add_special_tokens=False).input_ids
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "smollm2", "prompt": ids, "echo": True, "logprobs": 3,
                                                 "max_tokens": 0})
    assert r.status_code == 200, r.text
    ours = torch.tensor(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch.float32).eval()
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    theirs = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert len(ours) == len(ids) - 1 and (ours - theirs).abs().max() < 1e-4


def test_lm_eval_through_the_server_equals_lm_eval_hf_on_the_folder(served, tmp_path):
    app, _ = served
    folder = str(smollm2_folder())
    include = harness.prepare_tasks(tmp_path / "tasks")
    with LiveServer(app) as live:
        ours = harness.evaluate("local-completions", harness.server_model_args(live.url, "smollm2", folder),
                                ["qforge_mc"], include, limit=DOCS)
    theirs = harness.evaluate("hf", {"pretrained": folder, "dtype": "float32", "device": "cpu"}, ["qforge_mc"],
                              include, limit=DOCS)
    print("served:", ours, "\nhf:", theirs)
    assert ours == theirs and set(theirs["qforge_mc"]) >= {"acc"}
