"""Triton kernel tests. Without CUDA they run in Triton's CPU interpreter on CPU tensors; with CUDA
(benchmarks/gpu_check.sh) they run compiled on the GPU. The environment variable must be set before
anything imports triton (triton.jit reads it when a kernel module is imported)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# bf16 output rounding is 2^-9 relative, fp16 2^-12; products add summation-order noise on top.
# Tolerances on max |got - ref| / max |ref|, ref computed in float32 from the same rounded inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


@pytest.fixture
def device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
