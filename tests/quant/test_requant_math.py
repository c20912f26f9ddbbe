"""The int4 group scheme, FP8, GPTQ and AWQ against compressed-tensors' own packing and
dequantisation (the oracle) and against round-to-nearest (GPTQ / AWQ must do better)."""
import pytest
import torch

from qforge.quant.awq import awq_scales, fake_int4
from qforge.quant.fp8 import FP8_MAX, fp8_dequantize, fp8_quantize
from qforge.quant.gptq import HessianAccumulator, gptq_quantize
from qforge.quant.int4_groups import dequantize_int4, group_size_for, pack_int4, rtn_int4, unpack_int4

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few loud channels and correlated columns, as transformer activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    loud = torch.ones(d)
    loud[torch.randperm(d, generator=g)[: d // 16]] = 20.0
    return (torch.randn(n, d, generator=g) @ mix) * loud


@pytest.mark.parametrize("cols", [8, 64, 200, 13])
def test_pack_matches_compressed_tensors(cols):
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-8, 8, (5, cols), generator=g, dtype=torch.int8)
    ours = pack_int4(q)
    theirs = ct_helpers.pack_to_int32(q, 4)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int4(ours, cols), q)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, 4, torch.Size((5, cols))), q)


def test_group_size_choice():
    assert group_size_for(256) == 128 and group_size_for(576) == 64 and group_size_for(96) == 32
    assert group_size_for(100) == 100  # nothing divides: one scale per output channel


def test_int4_round_trip_and_dequant_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    q, scale = rtn_int4(w, 128, torch.bfloat16)
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == (16, 2) and scale.dtype == torch.bfloat16
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    # the package's decompression with the scales as a float32 model holds them, and in bf16
    theirs = dequantize(q, scale.float(), None, args, dtype=torch.float32)
    assert torch.equal(dequantize_int4(q, scale, 128), theirs)
    theirs_bf16 = dequantize(q, scale, None, args, dtype=torch.bfloat16)
    assert torch.equal(dequantize_int4(q, scale, 128).bfloat16(), theirs_bf16)
    # round to nearest: half a step, plus at the +absmax end the clamp from 7.5 to 7 steps (7.5 * 2^-8
    # more with the scale rounded to bf16)
    step = scale.float().repeat_interleave(128, 1)
    bound = step * (0.5 + 7.5 * 2 ** -8)
    assert ((dequantize_int4(q, scale, 128) - w).abs() <= bound).all()


def test_fp8_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    w[3] = 0
    q, scale = fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1) and scale.dtype == torch.float32
    assert float(q.float().abs().amax()) == FP8_MAX
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    assert torch.equal(fp8_dequantize(q, scale), dequantize(q, scale, None, args, dtype=torch.float32))
    rel = (fp8_dequantize(q, scale) - w).abs() / w.abs().clamp(min=1e-30)
    big = w.abs() > scale * 2 ** -6  # normal E4M3 range: 3 mantissa bits, relative error <= 2^-4
    assert (rel[big] <= 2 ** -4 + 1e-6).all()


def test_hessian_accumulator_equals_formula():
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    acc = HessianAccumulator(16)
    acc.add(x[0])
    acc.add(x[1:])
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(acc.hessian, 2 * flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)


def output_mse(x, w, w_hat):
    return float((x @ (w - w_hat).T).pow(2).mean())


@pytest.mark.parametrize("group", [128, 32, 256])
def test_gptq_beats_rtn_on_held_out_inputs(group):
    d, out = 256, 64
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(3)) * 0.05
    x = correlated_inputs(2048, d)
    calib, held = x[:1024], x[1024:]
    acc = HessianAccumulator(d)
    acc.add(calib)
    q, scale = gptq_quantize(w, acc.hessian, group, torch.float32)
    assert q.dtype == torch.int8 and scale.shape == (out, d // group)
    gptq = output_mse(held, w, dequantize_int4(q, scale, group))
    rtn = output_mse(held, w, fake_int4(w, group, torch.float32))
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_gptq_with_identity_hessian_is_rtn():
    """H = I: no column informs another, so the error feedback is zero and GPTQ is RTN."""
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(4))
    q, scale = gptq_quantize(w, torch.eye(128), 128, torch.float32, damp=0.0)
    q0, s0 = rtn_int4(w, 128, torch.float32)
    assert torch.equal(scale, s0) and torch.equal(q, q0)


def test_awq_beats_rtn_on_held_out_inputs():
    d = 256
    x = correlated_inputs(2048, d, seed=5)
    ws = [torch.randn(o, d, generator=torch.Generator().manual_seed(6 + o)) * 0.05 for o in (64, 32)]
    s, alpha, err, rtn_err = awq_scales(x[:1024], ws, [128, 128], torch.float32)
    assert alpha > 0 and err < rtn_err
    held = x[1024:]
    awq = sum(output_mse(held, w, fake_int4(w * s, 128, torch.float32) / s) for w in ws)
    rtn = sum(output_mse(held, w, fake_int4(w, 128, torch.float32)) for w in ws)
    assert awq < 0.9 * rtn, (awq, rtn)
