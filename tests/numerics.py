"""Tolerances that follow from the arithmetic, not from one machine's kernels.

torch picks CPU kernels by capability (ATEN_CPU_CAPABILITY=default|avx2|avx512, AMX...), and each
may block, vectorise and order a reduction differently; two computations of the same value agree
only to the rounding of their float32 sums. A sum of n terms, each at most `scale` in size,
computed in two orders (or from inputs that differ by an ulp) differs by at most about
n * eps * scale (the worst case of recursive summation, rarely reached); a value rounded to BF16
carries a relative error of up to 2^-9 (half of its 2^-8 step).
"""
import torch

EPS32 = torch.finfo(torch.float32).eps     # 2^-23 ~ 1.19e-7
BF16_STEP = 2.0 ** -8                      # relative spacing of BF16 values (8 significand bits)


def sum_atol(n_terms: int, scale: float | torch.Tensor, eps: float = EPS32) -> float:
    """Absolute gap allowed between two float32 sums of `n_terms` terms of size <= `scale`."""
    return float(n_terms * eps * float(scale))


def grad_atol(grad: torch.Tensor, n_terms: int) -> float:
    """sum_atol for a gradient accumulated over `n_terms` contributions (tokens, rows), taking
    the tensor's largest entry as the size of a term: entries near zero need an absolute bound
    set by their neighbours, which rtol (relative to the entry itself) cannot give."""
    return sum_atol(n_terms, grad.detach().abs().max())


def aten_fuses_multiply_add() -> bool:
    """Whether torch's CPU elementwise kernels run vectorised (AVX2 / AVX-512), where add_(x,
    alpha=a) and addcmul_ round once as a fused multiply-add. Under ATEN_CPU_CAPABILITY=default
    they run scalar code without FMA, and every multiply and add rounds: qforge's native AdamW
    kernel (written to the vectorised path's roundings) and bitsandbytes then differ from the
    torch path by an ulp here and there, so bit-identity holds only where this is True."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def assert_same_adamw_result(p, p_ref, codes_absmax, steps: int) -> None:
    """Bit-identical where the kernels round alike (aten_fuses_multiply_add); else within the
    rounding of `steps` AdamW updates: the parameter within 8 ulps of its largest entry per step
    (weight decay, the update's product, quotient and sum each round once), each absmax within 4
    relative eps per step, and each 8-bit code within one level (a moment an ulp away from a code
    boundary lands on the neighbouring code). codes_absmax: [(name, ours, reference), ...]."""
    if aten_fuses_multiply_add():
        assert torch.equal(p, p_ref)
        for name, ours, ref in codes_absmax:
            assert torch.equal(ours, ref), name
        return
    scale = p_ref.detach().float().abs().max()
    torch.testing.assert_close(p.float(), p_ref.float(), rtol=0, atol=sum_atol(8 * steps, scale))
    for name, ours, ref in codes_absmax:
        if ours.dtype == torch.uint8:
            assert (ours.int() - ref.int()).abs().max() <= 1, name
        else:
            torch.testing.assert_close(ours, ref, rtol=4 * steps * EPS32, atol=0, msg=name)
