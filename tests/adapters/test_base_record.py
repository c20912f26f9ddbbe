"""An adapter records the base it was trained on (qforge_base.json beside PEFT's files): PEFT's
PeftModel and AutoPeftModelForCausalLM still load the folder; a server registering it on another
base warns (logged and in /v1/adapters), or with strict_bases refuses with a 400 naming both."""
import json
import logging

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qforge.adapters import save_adapter
from qforge.adapters.base_record import BASE_RECORD_NAME, base_mismatch, describe_base, read_base_record
from qforge.app import ServeConfig, build_server
from qforge.model.load import load_model
from qforge.model.serving import load_serving_model
from qforge.serve import AdapterRegistry
from qforge.serve.registry import AdapterError

from tests.fixtures import random_lora, tiny_model_folder

NF4 = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32"}
DENSE = {"quant_type": "none", "blocksize": None, "double_quant": None, "compute_dtype": "float32"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(dense base folder, adapter trained on its NF4 form, adapter trained on it dense) under one root."""
    root = tmp_path_factory.mktemp("bases")
    base = tiny_model_folder(root / "tiny")
    out = [base]
    for name, kwargs in (("on_nf4", {}), ("on_dense", {"quantize": False})):
        model, _ = (load_serving_model(str(base), "none", compute_dtype=torch.float32) if kwargs else
                    load_model(str(base), compute_dtype=torch.float32))
        random_lora(model, name, seed=len(out))
        out.append(save_adapter(model, root / "adapters" / name, name=name, base_model_name_or_path=str(base)))
    return out


def test_the_record_is_the_training_base(folders):
    _, on_nf4, on_dense = folders
    assert json.loads((on_nf4 / BASE_RECORD_NAME).read_text()) == NF4
    assert read_base_record(on_dense) == DENSE
    hqq, _ = load_model(str(folders[0]), quant_type="hqq4", blocksize=32, compute_dtype=torch.bfloat16)
    assert describe_base(hqq) == {"quant_type": "hqq4", "blocksize": 32, "double_quant": False,
                                  "compute_dtype": "bfloat16"}


def test_peft_and_auto_peft_still_load_the_folder(folders):
    from peft import AutoPeftModelForCausalLM, PeftModel

    base, on_nf4, _ = folders
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(on_nf4))
    auto = AutoPeftModelForCausalLM.from_pretrained(str(on_nf4))
    ours = load_file(str(on_nf4 / "adapter_model.safetensors"))
    for model in (theirs, auto):
        state = model.state_dict()
        for key, value in ours.items():
            assert torch.equal(state[key.replace(".weight", ".default.weight")], value), key


def test_mismatch_names_both_bases():
    assert base_mismatch(NF4, dict(NF4, compute_dtype="bfloat16")) is None  # compute dtype: same weights
    assert base_mismatch(None, NF4) is None and base_mismatch(NF4, None) is None
    message = base_mismatch(DENSE, NF4)
    assert "trained on base dense (float32)" in message and "served on base nf4 (blocksize 64, double quant)" in message
    assert "fp4" in base_mismatch(NF4, dict(NF4, quant_type="fp4"))


def test_registration_on_another_base_warns_or_refuses(folders, caplog):
    base, on_nf4, on_dense = folders
    model, _ = load_serving_model(str(base), "none", compute_dtype=torch.float32)
    registry = AdapterRegistry(model, "tiny", adapter_root=on_nf4.parent)
    with caplog.at_level(logging.WARNING, logger="qforge.serve"):
        entry = registry.add("a", "on_nf4")
    assert "trained on base nf4" in entry.base_warning and "served on base dense (float32)" in entry.base_warning
    assert "adapter 'a' was trained on base nf4" in caplog.text
    assert registry.add("b", "on_dense").base_warning is None
    strict = AdapterRegistry(model, "tiny2", adapter_root=on_nf4.parent, strict_bases=True)
    with pytest.raises(AdapterError, match=r"trained on base nf4 .* served on base dense .*--strict-bases") as err:
        strict.add("a", "on_nf4")
    assert err.value.status == 400 and "a" not in strict.names()
    strict.add("b", "on_dense")


def test_the_warning_and_the_refusal_over_http(folders):
    base, on_nf4, _ = folders
    root = str(on_nf4.parent)
    for strict in (False, True):
        app, engine = build_server(ServeConfig(base=str(base), dtype="float32", quant_type="nf4",
                                               adapter_root=root, strict_bases=strict))
        try:
            with TestClient(app) as client:
                r = client.post("/v1/adapters", json={"name": "d", "path": "on_dense"})
                listed = {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}
                same = client.post("/v1/adapters", json={"name": "n", "path": "on_nf4"})
        finally:
            engine.stop()
        assert same.status_code == 201 and "warning" not in same.json()
        if strict:
            assert r.status_code == 400 and "d" not in listed
            message = r.json()["error"]["message"]
            assert "trained on base dense (float32)" in message and "served on base nf4" in message
        else:
            assert r.status_code == 201 and "served on base nf4" in r.json()["warning"]
            assert "trained on base dense (float32)" in listed["d"]["warning"]
