"""bitsandbytes-format folders, both ways: transformers + bitsandbytes load what `qforge quantize`
writes, and qforge loads what transformers + bitsandbytes `save_pretrained` wrote, as stored.

Logits are compared in float32 compute with bitsandbytes' layers in train mode (its eval-mode CPU
forward repacks the weight in place, DESIGN.md); both sides dequantise the same bytes with the same
levels and run the same float32 ops, so the tolerance is 1e-5 (observed: exactly equal).
"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from qforge.cli import main
from qforge.model.checkpoint import save_quantized
from qforge.model.load import load_model
from qforge.model.surgery import add_adapter
from qforge.nn import AdaptedLinear, LoraSpec, Quant4bitBase

from .conftest import write_tiny

bnb = pytest.importorskip("bitsandbytes")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def stored(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("args,quant_type,nested", [([], "nf4", True),
                                                    (["--quant-type", "fp4", "--no-double-quant", "--blocksize", "128"],
                                                     "fp4", False)])
def test_transformers_bitsandbytes_loads_qforge_quantize_output(tiny_dir, tmp_path, token_ids, capsys, args,
                                                                 quant_type, nested):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_dir), str(out), "--compute-dtype", "float32", *args]) == 0
    summary = capsys.readouterr().out
    assert "layers quantised : 14" in summary and "checkpoint" in summary and "time" in summary
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == (quant_type, nested)
    assert (qc["bnb_4bit_compute_dtype"], qc["bnb_4bit_quant_storage"]) == ("float32", "uint8")
    assert qc["llm_int8_skip_modules"] == ["lm_head"]

    theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").train()
    assert isinstance(theirs.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    ours, tokenizer = load_model(out, compute_dtype=torch.float32)
    direct, _ = load_model(tiny_dir, compute_dtype=torch.float32, quant_type=quant_type, double_quant=nested,
                           blocksize=128 if args else 64)
    torch.testing.assert_close(logits(theirs, token_ids), logits(ours, token_ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(direct, token_ids), logits(ours, token_ids), rtol=0, atol=0)
    assert tokenizer.chat_template and "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_qforge_loads_bitsandbytes_save_pretrained_as_stored(tmp_path, token_ids):
    from transformers import BitsAndBytesConfig

    plain = write_tiny(tmp_path / "plain", tied=False, bias=True)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(plain), quantization_config=config, device_map="cpu")
    theirs.save_pretrained(str(tmp_path / "bnb"))  # before any forward: eval forwards repack the weight
    files = stored(tmp_path / "bnb")

    ours, _ = load_model(tmp_path / "bnb", compute_dtype=torch.float32)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, AdaptedLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():  # not requantised: the very bytes on disk
        assert torch.equal(layer.weight, files[name + ".weight"]), name
        assert torch.equal(layer.base.quant_state.absmax, files[name + ".weight.absmax"]), name
        assert torch.equal(layer.bias, files[name + ".bias"]), name
    torch.testing.assert_close(logits(ours, token_ids), logits(theirs.train(), token_ids), rtol=1e-5, atol=1e-5)


def test_save_quantized_round_trip_without_adapters(tiny_dir, tmp_path, token_ids):
    model, tokenizer = load_model(tiny_dir, compute_dtype=torch.float32)
    add_adapter(model, "default", LoraSpec(r=4, dropout=0.0, dtype=torch.float32))
    for m in model.modules():
        if isinstance(m, AdaptedLinear):
            nn.init.normal_(m.adapters["default"].lora_B.weight)  # an adapter that changes the output
    save_quantized(model, tokenizer, tmp_path / "out")
    umask = os.umask(0o22)
    os.umask(umask)
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not private
    keys = stored(tmp_path / "out")
    assert not [k for k in keys if "adapters" in k or "lora_" in k]
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: written once
    back, _ = load_model(tmp_path / "out", compute_dtype=torch.float32)
    for name, layer in back.named_modules():
        if isinstance(layer, AdaptedLinear):
            assert torch.equal(layer.weight, model.get_submodule(name).weight)
    for m in model.modules():
        if isinstance(m, AdaptedLinear):
            m.active_adapter = None
    torch.testing.assert_close(logits(back, token_ids), logits(model, token_ids), rtol=0, atol=0)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_save_is_atomic_and_never_overwrites(tiny_dir, tmp_path, monkeypatch):
    model, _ = load_model(tiny_dir, compute_dtype=torch.float32)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="full.*not an empty folder"):
        save_quantized(model, None, tmp_path / "full")
    assert main(["quantize", str(tiny_dir), str(tmp_path / "full")]) == 2

    import qforge.model.checkpoint as ckpt

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, None, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no folder, no temporary left


def test_save_refuses_a_model_without_4bit_layers(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quantize=False)
    with pytest.raises(ValueError, match="no 4-bit"):
        save_quantized(model, None, tmp_path / "out")


def test_quantize_command_on_the_device_writes_the_cpu_bytes(tiny_dir, tmp_path, capsys, device):
    """`qforge quantize --device D`: the weights are quantised on D and the folder written from host
    copies holds exactly the bytes of a CPU run."""
    assert main(["quantize", str(tiny_dir), str(tmp_path / "cpu"), "--compute-dtype", "float32", "--device", "cpu"]) == 0
    assert main(["quantize", str(tiny_dir), str(tmp_path / "dev"), "--compute-dtype", "float32",
                 "--device", device]) == 0
    capsys.readouterr()
    want, got = stored(tmp_path / "cpu"), stored(tmp_path / "dev")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
