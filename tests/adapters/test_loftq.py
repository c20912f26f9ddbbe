"""LoftQ against its own promise: dequant(Q) + s B A is closer to W than plain NF4, and more
iterations bring it closer still; on a random matrix and on a real SmolLM2 weight."""
import pytest
import torch
from torch import nn

from qforge.adapters import loftq_error, loftq_init, loftq_linear, quantize_linears_loftq
from qforge.model.surgery import linear_names, quantize_linears, select_targets
from qforge.nn import AdaptedLinear, LoraSpec, Quant4bitBase
from qforge.quant import quantize

from .conftest import logits, rel_err, tiny_dense


def errors(w: torch.Tensor, r: int = 16, scaling: float = 2.0) -> tuple[float, float, float]:
    """(plain NF4, LoftQ 1 iteration, LoftQ 5 iterations) Frobenius errors for weight w."""
    plain = loftq_error(w, quantize(w))
    one = loftq_error(w, *loftq_init(w, r, 1, scaling=scaling), scaling=scaling)
    five = loftq_error(w, *loftq_init(w, r, 5, scaling=scaling), scaling=scaling)
    return plain, one, five


def test_loftq_lowers_the_error_on_a_random_matrix():
    torch.manual_seed(0)
    # a low-rank signal plus noise, the shape of trained weights' spectra
    w = 0.02 * torch.randn(256, 384) + 0.05 * torch.randn(256, 8) @ torch.randn(8, 384) / 8
    plain, one, five = errors(w)
    assert one < 0.97 * plain
    assert five < one


def test_loftq_lowers_the_error_on_a_real_smollm2_weight():
    from qforge.model.embedded import gguf_matrices

    try:
        (_, array), = gguf_matrices(names=["blk.0.attn_q.weight"])
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    w = torch.from_numpy(array)
    assert w.shape == (576, 576)
    plain, one, five = errors(w)
    assert one < 0.97 * plain
    assert five < one


def test_scaling_is_divided_out_of_a_and_b():
    torch.manual_seed(1)
    w = torch.randn(64, 96)
    q1, a1, b1 = loftq_init(w, 8, 2, scaling=1.0)
    q4, a4, b4 = loftq_init(w, 8, 2, scaling=4.0)
    assert torch.equal(q1.packed, q4.packed)
    torch.testing.assert_close(4.0 * b4 @ a4, b1 @ a1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a4.norm(), a1.norm() / 2, rtol=1e-5, atol=0)  # split evenly: sqrt(s) each
    assert a1.shape == (8, 96) and b1.shape == (64, 8) and q1.dtype == torch.float32


def test_loftq_linear_starts_at_the_loftq_approximation():
    torch.manual_seed(2)
    lin = nn.Linear(128, 96).to(torch.bfloat16)
    spec = LoraSpec(r=8, alpha=16, dropout=0.0, loftq_iters=3, dtype=torch.float32, use_dora=True)
    layer = loftq_linear(lin, spec, compute_dtype=torch.float32)
    plain = AdaptedLinear.quantized(lin, compute_dtype=torch.float32)
    assert layer.base.quant_state.dtype == torch.bfloat16  # the checkpoint records the source dtype
    x = torch.randn(5, 128)
    dense = x @ lin.weight.float().T + lin.bias.float()
    assert rel_err(layer(x), dense) < rel_err(plain(x), dense)
    w0 = layer.dequantized(torch.float32) + layer.adapters["default"].delta_weight()
    torch.testing.assert_close(layer.adapters["default"].magnitude, w0.norm(dim=1))  # DoRA scale 1 at start


def test_model_level_loftq_brings_logits_closer_to_the_dense_model(ids):
    dense = tiny_dense()
    plain = tiny_dense()
    quantize_linears(plain, select_targets(linear_names(plain), "all-linear"), compute_dtype=torch.float32)
    loft = tiny_dense()
    spec = LoraSpec(r=8, alpha=16, dropout=0.0, loftq_iters=4, dtype=torch.float32,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapted = quantize_linears_loftq(loft, spec, compute_dtype=torch.float32)
    assert len(adapted) == 14 and isinstance(loft.model.layers[0].mlp.up_proj, AdaptedLinear)
    assert isinstance(loft.lm_head, nn.Linear)  # skipped, as quantize_linears does
    ref = logits(dense, ids)
    assert rel_err(logits(loft, ids), ref) < rel_err(logits(plain, ids), ref)


def test_bad_arguments():
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="rank 40"):
        loftq_init(w, 40, 1)
    with pytest.raises(ValueError, match="iters"):
        loftq_init(w, 4, 0)
    with pytest.raises(ValueError, match="2-D"):
        loftq_init(w.flatten(), 4, 1)
