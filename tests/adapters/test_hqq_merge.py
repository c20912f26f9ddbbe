"""Merging an adapter trained on an HQQ base: dequantise (as trained), merge in float32, optionally
requantise to HQQ or NF4; in place refused with the measured reason. Tiny random Llama."""
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from qforge import cli
from qforge.adapters import merge_in_place_4bit, save_adapter, save_merged
from qforge.adapters.merge import InPlaceMergeError, merged_weight
from qforge.model.load import load_model
from qforge.model.surgery import add_adapter, adapted_layers, hqq_layers, quantized_layers
from qforge.nn import LoraSpec
from qforge.nn.hqq_base import HQQBase

from .conftest import logits, randomise_adapter, rel_err, tiny_dense_folder


@pytest.fixture
def hqq_trained(tmp_path):
    """(base folder, the HQQ-3 model with a random adapter, its adapter folder beside a run config.yaml)."""
    tiny_dense_folder(tmp_path / "base")
    model, _ = load_model(str(tmp_path / "base"), quant_type="hqq3", blocksize=32, compute_dtype=torch.float32)
    add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    randomise_adapter(model)
    run = tmp_path / "run"
    save_adapter(model, run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"quant_type": "hqq3", "hqq_group_size": 32}))
    return tmp_path / "base", model.eval(), run / "adapter"


def test_merge_command_dequantises_the_hqq_base_the_run_trained_on(tmp_path, hqq_trained, ids):
    base, model, adapter = hqq_trained
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype",
            "float32"]
    assert cli.main(argv) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert rel_err(logits(merged, ids), logits(model, ids)) < 1e-5
    # told nf4 instead, the merge dequantises another base: the logits move
    assert cli.main(argv[:5] + ["--out", str(tmp_path / "nf4"), "--base-quant-type", "nf4", "--dtype", "float32"]) == 0
    wrong = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"), dtype=torch.float32).eval()
    assert rel_err(logits(wrong, ids), logits(model, ids)) > 1e-3


@pytest.mark.parametrize("requantize", ["hqq4", "hqq2", "nf4"])
def test_merge_and_requantise(tmp_path, hqq_trained, ids, requantize):
    _, model, _ = hqq_trained
    out = save_merged(model, None, tmp_path / "q", dtype=torch.float32, requantize=requantize, group_size=64)
    config = json.loads((out / "config.json").read_text())
    provenance = json.loads((out / "qforge_merge.json").read_text())
    assert provenance["requantize"] == requantize and provenance["requantize_error_over_update"] > 0
    back, _ = load_model(str(out), compute_dtype=torch.float32)
    if requantize.startswith("hqq"):
        assert config["quantization_config"]["quant_method"] == "hqq"
        layers = dict(hqq_layers(back))
        for name, layer in adapted_layers(model):   # the stored codes are HQQ's of the merged weight
            expect = HQQBase.from_weight(merged_weight(layer, layer.adapters["default"]), int(requantize[3:]), 64)
            assert torch.equal(layers[name].base.hqq_state.packed, expect.hqq_state.packed)
            assert torch.equal(layers[name].base.hqq_state.scale, expect.hqq_state.scale)
    else:
        assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
        assert len(list(quantized_layers(back))) == 14
    err = rel_err(logits(back, ids), logits(model, ids))
    assert err < {"hqq4": 0.5, "nf4": 0.5, "hqq2": 1.5}[requantize], err  # a random tiny model: sanity only


def test_in_place_merge_into_an_hqq_base_is_refused_with_the_measured_reason(hqq_trained):
    _, model, _ = hqq_trained
    with pytest.raises(InPlaceMergeError, match=r"refused.*HQQ.*Measured on layer '.*': [0-9.]+% of the packed "
                                                r"code bytes would not change"):
        merge_in_place_4bit(model, "default")


def test_bad_requantize_is_an_error():
    with pytest.raises(ValueError, match="requantize must be None or one of nf4, fp4, hqq4, hqq3, hqq2"):
        save_merged(torch.nn.Linear(2, 2), None, "/nonexistent", requantize="hqq5")


def test_the_trained_quant_type_comes_from_the_run_or_the_flags(tmp_path, hqq_trained, monkeypatch):
    from qforge.commands import export as export_command
    from qforge.commands import merge as merge_command

    _, _, adapter = hqq_trained
    assert merge_command.trained_quant(adapter) == ("hqq3", 32)
    assert merge_command.trained_quant(adapter, "nf4", 64) == ("nf4", 64)
    assert merge_command.trained_quant(tmp_path / "nowhere" / "adapter") == ("nf4", 64)
    with pytest.raises(ValueError, match="--hqq-group-size must be a positive integer, got 0"):
        merge_command.trained_quant(adapter, "hqq4", 0)
    seen = {}

    def stub(source, device=None, **kw):  # export loads the base as the run trained it
        seen.update(kw)
        raise RuntimeError("stop here")
    from qforge.model import load as load_module
    monkeypatch.setattr(load_module, "load_quantised_base", stub)
    with pytest.raises(RuntimeError, match="stop here"):
        export_command._export_merged(type("A", (), {"base": "b", "adapter": str(adapter)})(), tmp_path / "m.gguf", "m")
    assert seen == {"quant_type": "hqq3", "group_size": 32}
