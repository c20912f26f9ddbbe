"""QuantState <-> bitsandbytes' checkpoint keys, in both directions, through a real safetensors file."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file

from qforge.quant import QuantState, dequantize, quantize


def _strip(sd, prefix):
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_qforge_state_dict_loads_into_bitsandbytes(tmp_path, quant_type, double_quant, dtype):
    w = (torch.randn(192, 256) * 0.05).to(dtype)
    state = quantize(w, quant_type, 64, double_quant)
    prefix = "model.layers.0.mlp.up_proj.weight"
    save_file(state.to_state_dict(prefix), tmp_path / "w.safetensors")
    sd = load_file(tmp_path / "w.safetensors")
    assert set(sd) == set(state.to_state_dict(prefix))

    qs = bnbF.QuantState.from_dict(_strip(sd, prefix), device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(sd[prefix], qs), dequantize(state))
    param = bnb.nn.Params4bit.from_prequantized(sd[prefix], _strip(sd, prefix), requires_grad=False, device="cpu")
    assert torch.equal(bnbF.dequantize_4bit(param.data, param.quant_state), dequantize(state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_state_dict_loads_into_qforge(tmp_path, quant_type, double_quant):
    w = torch.randn(96, 320, dtype=torch.bfloat16) * 0.05
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    prefix = "lm.q.weight"
    sd = {prefix: packed, **{f"{prefix}.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    save_file(sd, tmp_path / "b.safetensors")
    state = QuantState.from_state_dict(load_file(tmp_path / "b.safetensors"), prefix)
    assert torch.equal(dequantize(state), bnbF.dequantize_4bit(packed, qs))
    # and back out again: the same keys and the same bytes
    again = state.to_state_dict(prefix)
    assert set(again) == set(sd)
    for k in sd:
        assert torch.equal(again[k], sd[k]), k


def test_metadata_json_is_bitsandbytes_own():
    w = torch.randn(64, 64)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quantize(w, "nf4", 64, True).to_state_dict("w")
    theirs = qs.as_dict(packed=True)
    assert torch.equal(ours["w.quant_state.bitsandbytes__nf4"], theirs["quant_state.bitsandbytes__nf4"])


def test_bits_per_parameter():
    w = torch.randn(4096, 4096)
    nf4_dq = quantize(w, "nf4", 64, True)
    nf4 = quantize(w, "nf4", 64, False)
    assert abs(nf4_dq.nbytes() * 8 / w.numel() - 4.127) < 0.01
    assert abs(nf4.nbytes() * 8 / w.numel() - 4.5) < 0.01


@pytest.mark.parametrize("missing", ["w.absmax", "w.quant_map", "w.nested_absmax", "w.nested_quant_map", "w"])
def test_missing_key_is_named(missing):
    sd = quantize(torch.randn(64, 64), "nf4", 64, True).to_state_dict("w")
    del sd[missing]
    with pytest.raises(ValueError, match=f"'{missing}'"):
        QuantState.from_state_dict(sd, "w")


def test_inconsistent_keys_are_named():
    sd = quantize(torch.randn(64, 64), "nf4", 64, False).to_state_dict("w")
    bad = dict(sd, **{"w.absmax": sd["w.absmax"][:-1]})
    with pytest.raises(ValueError, match="'w.absmax'"):
        QuantState.from_state_dict(bad, "w")
    bad = dict(sd, **{"w": sd["w"][:-3]})
    with pytest.raises(ValueError, match="'w'"):
        QuantState.from_state_dict(bad, "w")
    bad = dict(sd, **{"w.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)})
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        QuantState.from_state_dict(bad, "w")
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        QuantState.from_state_dict({k: v for k, v in sd.items() if "quant_state" not in k}, "w")
