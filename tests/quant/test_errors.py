import pytest
import torch

from qforge.quant import dequantize, quantize


@pytest.mark.parametrize("weight,match", [
    (torch.arange(64, dtype=torch.int32), "int32"),
    (torch.ones(64, dtype=torch.uint8), "uint8"),
    (torch.empty(0, 64), "empty"),
    (torch.tensor([1.0, float("nan")] * 32), "NaN or Inf"),
    (torch.tensor([1.0, float("inf")] * 32), "NaN or Inf"),
])
def test_bad_weights(weight, match):
    with pytest.raises(ValueError, match=match):
        quantize(weight)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize(torch.randn(64), blocksize=blocksize)


def test_bad_quant_type():
    with pytest.raises(ValueError, match="'nf3'"):
        quantize(torch.randn(64), quant_type="nf3")


def test_bad_output_dtype():
    with pytest.raises(ValueError, match="dtype"):
        dequantize(quantize(torch.randn(64)), torch.int8)


@pytest.mark.parametrize("shape", [(1,), (3,), (65,), (5, 7, 9), (1, 1)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_any_shape_round_trips_shape_and_dtype(shape, quant_type):
    w = torch.randn(shape, dtype=torch.float16)
    out = dequantize(quantize(w, quant_type))
    assert out.shape == w.shape and out.dtype == torch.float16
    # every element is within half a level step of its block scale (NF4's widest gap is ~0.3)
    assert (out.float() - w.float()).abs().max() <= w.abs().max() * 0.17 + 1e-3
