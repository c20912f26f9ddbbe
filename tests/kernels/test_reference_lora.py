"""The torch reference of the gathered serving delta (what CPUs run) against an explicit loop."""
import pytest
import torch

from qforge.kernels import reference


@pytest.mark.parametrize("rows_shape", [(6, 5), (6,)], ids=["BxT", "B"])
def test_reference_gathered_lora_matches_loop(rows_shape):
    K, r, n_in, n_out = 3, 5, 40, 24
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*rows_shape, n_in, generator=g, dtype=torch.float64)
    A = torch.randn(K, r, n_in, generator=g, dtype=torch.float64)
    B = torch.randn(K, n_out, r, generator=g, dtype=torch.float64)
    slots = torch.tensor([0, K, 2, -1, 1, 0])
    scalings = torch.tensor([0.5, 2.0, 1.0])
    got = reference.gathered_lora(x, A, B, slots, scalings)
    concatenated = reference.concatenated_lora(x, A, B, slots, scalings)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    want = torch.zeros(x3.shape[0], x3.shape[1], n_out, dtype=torch.float64)
    for b, k in enumerate(slots.tolist()):
        if 0 <= k < K:
            want[b] = float(scalings[k]) * (x3[b] @ A[k].t()) @ B[k].t()
    want = want if x.dim() == 3 else want.squeeze(1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert not got[1].any() and not got[3].any()  # slot K and slot -1: no adapter, exactly zero
    torch.testing.assert_close(concatenated, want, rtol=1e-6, atol=1e-9)
    assert not concatenated[1].any() and not concatenated[3].any()


def test_concatenated_lora_equals_gathered_in_bfloat16():
    """The serving dtype: both round h to bf16 after scaling, so they differ only by the order in which
    the products accumulate."""
    K, r, n_in, n_out = 8, 16, 64, 48
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, n_in, generator=g).bfloat16()
    A = (torch.randn(K, r, n_in, generator=g) / 8).bfloat16()
    B = (torch.randn(K, n_out, r, generator=g) / 8).bfloat16()
    slots = torch.randint(-1, K, (32,), generator=g)
    scalings = torch.rand(K, generator=g) * 2
    want = reference.gathered_lora(x, A, B, slots, scalings).float()
    got = reference.concatenated_lora(x, A, B, slots, scalings).float()
    assert torch.equal(got[slots < 0], torch.zeros_like(got[slots < 0]))
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("rows_shape", [(6, 5), (6,)], ids=["BxT", "B"])
def test_native_gathered_lora_matches_loop_in_float32(rows_shape):
    """The native CPU kernel (qf_gathered_lora, what a mixed CPU batch runs) against the float64 loop:
    float32 sums of n_in (then r) terms, in another order than the loop's."""
    from qforge.kernels import cpu
    from tests.numerics import sum_atol

    if cpu.load() is None:
        pytest.skip("no C compiler here: dispatch uses the torch reference")
    K, r, n_in, n_out = 3, 5, 40, 24
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*rows_shape, n_in, generator=g)
    A, B = torch.randn(K, r, n_in, generator=g), torch.randn(K, n_out, r, generator=g)
    slots, scalings = torch.tensor([0, K, 2, -1, 1, 0]), torch.tensor([0.5, 2.0, 1.0])
    got = cpu.gathered_lora(x, A, B, slots, scalings)
    want = reference.gathered_lora(x.double(), A.double(), B.double(), slots, scalings.double())
    assert got.shape == want.shape and got.dtype == torch.float32
    h = (x.double().abs().reshape(6, -1, n_in) @ A.double().abs().amax((0, 1))).amax() * 2  # |h| bound
    atol = sum_atol(n_in, float(h) * r * float(B.abs().max())) + sum_atol(r, float(h) * float(B.abs().max()))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)
    assert not got[1].any() and not got[3].any()


def test_native_gathered_lora_equals_reference_in_bfloat16():
    """bf16 serving: both round h to bf16 before and after scaling and the delta once, so they differ
    only where a float32 sum in another order rounds to a neighbouring bf16 value."""
    from qforge.kernels import cpu

    if cpu.load() is None:
        pytest.skip("no C compiler here: dispatch uses the torch reference")
    K, r, n_in, n_out = 64, 16, 576, 192
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 1, n_in, generator=g).bfloat16()
    A = (torch.randn(K, r, n_in, generator=g) / 8).bfloat16()
    B = (torch.randn(K, n_out, r, generator=g) / 8).bfloat16()
    slots = torch.randint(-1, K, (32,), generator=g)
    scalings = torch.rand(K, generator=g) * 2
    want = reference.gathered_lora(x, A, B, slots, scalings).float()
    got = cpu.gathered_lora(x, A, B, slots, scalings).float()
    assert torch.equal(got[slots < 0], torch.zeros_like(got[slots < 0]))
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert (got == want).float().mean() > 0.5  # mostly the same bf16 values, not merely close
