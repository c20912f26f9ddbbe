"""HQQ model folders: quantise -> save -> load gives the same codes bit for bit and the same logits;
config.json says quant_method "hqq"; `qforge quantize --quant-type hqq*` writes one; bad folders
fail with the key named. Tiny random Llama."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qforge import cli
from qforge.model.checkpoint import save_quantized
from qforge.model.load import load_model
from qforge.model.surgery import hqq_layers, quantized_layers

from .conftest import write_tiny  # noqa: F401


@pytest.mark.parametrize("quant_type, group", [("hqq4", 64), ("hqq3", 32), ("hqq2", 64)])
def test_save_and_load_an_hqq_folder_bit_identically(tiny_dir, tmp_path, token_ids, quant_type, group):
    model, tok = load_model(str(tiny_dir), quant_type=quant_type, blocksize=group, compute_dtype=torch.float32)
    layers = dict(hqq_layers(model))
    assert len(layers) == 14 and not list(quantized_layers(model))
    out = save_quantized(model, tok, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hqq" and qc["skip_modules"] == ["lm_head"]
    assert qc["quant_config"]["weight_quant_params"]["nbits"] == int(quant_type[3:])
    assert qc["quant_config"]["weight_quant_params"]["group_size"] == group
    keys = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.W_q" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys

    back, tok2 = load_model(str(out), compute_dtype=torch.float32)  # read as stored, whatever quant_type says
    assert tok2 is not None
    for name, layer in hqq_layers(back):
        a, b = layer.base.hqq_state, layers[name].base.hqq_state
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    with torch.no_grad():
        assert torch.equal(back(token_ids).logits, model(token_ids).logits)


def test_quantize_command_writes_an_hqq_folder(tiny_dir, tmp_path, capsys):
    assert cli.main(["quantize", str(tiny_dir), str(tmp_path / "q3"), "--quant-type", "hqq3",
                     "--hqq-group-size", "32", "--compute-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "hqq3, group size 32, axis 1" in out and "bits per parameter" in out
    qc = json.loads((tmp_path / "q3" / "config.json").read_text())["quantization_config"]
    assert qc["quant_config"]["weight_quant_params"]["nbits"] == 3
    model, _ = load_model(str(tmp_path / "q3"))
    assert {layer.base.kind for _, layer in hqq_layers(model)} == {"hqq3"}
    assert cli.main(["quantize", str(tiny_dir), str(tmp_path / "bad"), "--quant-type", "hqq4",
                     "--hqq-group-size", "48"]) == 2
    assert "group size 48 does not divide" in capsys.readouterr().err


def test_a_broken_hqq_folder_names_the_key(tiny_dir, tmp_path):
    model, tok = load_model(str(tiny_dir), quant_type="hqq4", compute_dtype=torch.float32)
    out = save_quantized(model, tok, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.zero"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing key 'model\.layers\.1\.mlp\.up_proj\.zero'"):
        load_model(str(out))
    with pytest.raises(ValueError, match="stores HQQ weights; load it with quantize=True"):
        load_model(str(out), quantize=False)


def test_loftq_on_an_hqq_base_is_refused(tiny_dir):
    from qforge.adapters.loftq import load_loftq_model
    from qforge.nn import LoraSpec
    with pytest.raises(ValueError, match="LoftQ initialises adapters against an nf4/fp4 base"):
        load_loftq_model(str(tiny_dir), LoraSpec(r=4, loftq_iters=1), quant_type="hqq4")
