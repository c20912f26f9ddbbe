"""qforge.quant.hqq against the `hqq` package (0.2.8, the oracle): packed codes, scales, zeros and
the dequantised weight must be identical, and the state dicts interchangeable both ways."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from qforge.quant.hqq import (HQQSolver, HQQState, hqq_bits_per_param, hqq_dequantize, hqq_from_state_dict,
                              hqq_quantization_config, hqq_quantize, hqq_state_dict, pack_codes, unpack_codes)

from .conftest import student_t

hqq_quantize_mod = pytest.importorskip("hqq.core.quantize")
Quantizer, HQQLinear, BaseQuantizeConfig = (hqq_quantize_mod.Quantizer, hqq_quantize_mod.HQQLinear,
                                            hqq_quantize_mod.BaseQuantizeConfig)
BITS = [4, 3, 2]


def oracle(w, nbits, group_size=64, axis=1):
    """The package's quantiser as BaseQuantizeConfig configures it (round_zero at 4 bits only)."""
    packed, meta = Quantizer.quantize(w, nbits=nbits, group_size=group_size, axis=axis,
                                      round_zero=nbits == 4, device="cpu")
    meta["compute_dtype"] = torch.float32
    return packed, meta


def assert_matches_oracle(w, nbits, group_size=64, axis=1):
    packed, meta = oracle(w, nbits, group_size, axis)
    ours = hqq_quantize(w, nbits, group_size, axis)
    assert torch.equal(ours.packed, packed), "packed codes differ"
    assert torch.equal(ours.scale, meta["scale"]), "scales differ"
    assert torch.equal(ours.zero, meta["zero"]), "zeros differ"
    assert torch.equal(hqq_dequantize(ours), Quantizer.dequantize(packed, meta)), "dequantised weights differ"


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("axis", [1, 0])
def test_normal_weights_match_oracle(nbits, axis):
    w = torch.randn(192, 320, generator=torch.Generator().manual_seed(nbits)) * 0.02
    assert_matches_oracle(w, nbits, 64, axis)


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("group_size", [32, 128])
def test_student_t_weights_match_oracle(nbits, group_size):
    assert_matches_oracle(student_t((256, 384), seed=nbits), nbits, group_size)


@pytest.mark.parametrize("nbits", BITS)
def test_smollm2_weights_match_oracle(smollm2_weights, nbits):
    for name in ("blk.0.attn_k.weight", "blk.7.ffn_down.weight"):
        assert_matches_oracle(smollm2_weights[name], nbits)


def test_bfloat16_input_and_dequant_dtype():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    packed, meta = oracle(w, 4)
    ours = hqq_quantize(w, 4)
    assert torch.equal(ours.packed, packed)
    out = hqq_dequantize(ours, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert torch.equal(out, Quantizer.dequantize(packed, meta).bfloat16())


@pytest.mark.parametrize("nbits", [4, 3, 2, 8])
def test_pack_unpack_round_trip_and_odd_row_counts(nbits):
    g = torch.Generator().manual_seed(nbits)
    for rows in (20, 7):   # 7: not a multiple of the codes per word, padded with zero rows
        codes = torch.randint(0, 2 ** nbits, (rows, 16), generator=g).to(torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, nbits), nbits, rows), codes)
    codes = torch.randint(0, 2 ** nbits, (40, 8), generator=g).float()
    if nbits != 8:
        from hqq.core.bitpack import BitPack
        theirs = {4: BitPack.pack_4bit_u8, 3: BitPack.pack_3bit_32, 2: BitPack.pack_2bit_u8}[nbits](codes)
        assert torch.equal(pack_codes(codes, nbits), theirs)


def test_quantised_scales_and_zeros_match_oracle():
    """quant_scale / quant_zero as BaseQuantizeConfig(quant_scale=True, quant_zero=True) configures them."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    _, meta = oracle(w, 4)
    ours = hqq_quantize(w, 4, quant_scale=True, quant_zero=True)
    cfg = BaseQuantizeConfig(nbits=4, group_size=64, quant_scale=True, quant_zero=True)
    s_packed, s_meta = Quantizer.quantize(meta["scale"], device="cpu", **cfg["scale_quant_params"])
    z_packed, z_meta = Quantizer.quantize(meta["zero"], device="cpu", **cfg["zero_quant_params"])
    assert ours.scale is None and ours.zero is None
    assert torch.equal(ours.scale_q.packed, s_packed) and torch.equal(ours.zero_q.packed, z_packed)
    for m in (s_meta, z_meta):
        m["compute_dtype"] = torch.float32
    scale, zero = ours.meta_tensors()
    assert torch.equal(scale, Quantizer.dequantize(s_packed, s_meta))
    assert torch.equal(zero, Quantizer.dequantize(z_packed, z_meta))
    assert torch.equal(hqq_dequantize(ours), ((ours.codes().float() - zero) * scale).reshape(w.shape))
    # 8-bit meta-data costs little: the error stays within 2% of the float scales' error
    plain = (hqq_dequantize(hqq_quantize(w, 4)) - w).pow(2).mean()
    assert (hqq_dequantize(ours) - w).pow(2).mean() < 1.02 * plain
    assert ours.nbytes() < hqq_quantize(w, 4, meta_dtype=torch.float16).nbytes()


@pytest.mark.parametrize("nbits", BITS)
def test_state_dict_is_the_hqq_packages_layout(nbits):
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(nbits)) * 0.02
    ours = hqq_quantize(w, nbits)
    sd = hqq_state_dict(ours, "model.layers.0.q_proj.")
    # Theirs loads ours and dequantises to the same weight ...
    fresh = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu")
    fresh.load_state_dict({k.removeprefix("model.layers.0.q_proj."): v for k, v in sd.items()})
    assert torch.equal(fresh.dequantize(), hqq_dequantize(ours))
    # ... ours loads theirs, and the keys and values agree.
    theirs = HQQLinear.from_weights(w.clone(), None, BaseQuantizeConfig(nbits=nbits, group_size=64),
                                    compute_dtype=torch.float32, device="cpu").state_dict()
    assert set(theirs) == {k.removeprefix("model.layers.0.q_proj.") for k in sd}
    for key, value in theirs.items():
        assert torch.equal(sd["model.layers.0.q_proj." + key], value), key
    back = hqq_from_state_dict(theirs)
    assert torch.equal(hqq_dequantize(back), hqq_dequantize(ours)) and back.nbits == nbits and back.axis == 1


def test_state_dict_round_trip_through_safetensors(tmp_path):
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))
    for state in (hqq_quantize(w, 3, meta_dtype=torch.float16), hqq_quantize(w, 2, quant_scale=True, quant_zero=True)):
        save_file(state.to_state_dict("layer."), tmp_path / "m.safetensors")
        back = HQQState.from_state_dict(load_file(tmp_path / "m.safetensors"), "layer.")
        assert torch.equal(back.dequantize(), state.dequantize())
        assert back.nbytes() == state.nbytes()


def test_bits_per_param_matches_storage():
    w = torch.randn(640, 1280, generator=torch.Generator().manual_seed(0))
    for nbits in BITS:
        state = hqq_quantize(w, nbits, meta_dtype=torch.float16)
        assert state.nbytes() * 8 / w.numel() == pytest.approx(hqq_bits_per_param(nbits, 64), rel=1e-3)
        state = hqq_quantize(w, nbits, quant_scale=True, quant_zero=True)
        assert state.nbytes() * 8 / w.numel() == pytest.approx(hqq_bits_per_param(nbits, 64, True, 32), rel=1e-3)
    assert hqq_bits_per_param(4, 64) == 4.5 and hqq_bits_per_param(3, 64) == pytest.approx(3.7)


def test_solver_lowers_the_error_and_annealing_is_optional():
    w = student_t((256, 256), seed=9)
    plain = hqq_quantize(w, 3, optimize=False)
    solved = hqq_quantize(w, 3)
    annealed = hqq_quantize(w, 3, solver=HQQSolver(anneal_beta=True, early_stop=False))
    err = lambda s: (hqq_dequantize(s) - w).abs().mean()  # noqa: E731
    assert err(solved) < err(plain) and err(annealed) < err(plain)


def test_quantization_config_is_transformers_hqq_config():
    from transformers import HqqConfig
    assert hqq_quantization_config(3, 64) == {**HqqConfig(nbits=3, group_size=64).to_dict(), "quant_method": "hqq"}


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="nbits must be one of"):
        hqq_quantize(torch.randn(64, 64), 5)
    with pytest.raises(ValueError, match="group_size 64 does not divide"):
        hqq_quantize(torch.randn(10, 10), 4)
    sd = hqq_quantize(torch.randn(64, 64), 4).to_state_dict("p.")
    with pytest.raises(ValueError, match="missing key 'p.zero'"):
        hqq_from_state_dict({k: v for k, v in sd.items() if k != "p.zero"}, "p.")
    with pytest.raises(ValueError, match="key 'p.W_q' is torch.uint8"):
        hqq_from_state_dict({**sd, "p.W_q": sd["p.W_q"][:3]}, "p.")
