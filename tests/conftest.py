import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads TRITON_INTERPRET when it is first imported, and torch / transformers import it early,
# so the choice is made here, before any test module loads. benchmarks/gpu_check.sh sets
# QFORGE_GPU_TESTS=1 to run the kernel tests compiled on a GPU instead of in the interpreter.
if os.environ.get("QFORGE_GPU_TESTS") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
warnings.filterwarnings("ignore", message=".*kernels-community.*")

import pytest  # noqa: E402
import torch  # noqa: E402

# Every test of device-aware code takes its device from the `device` fixture: the CPU always, and
# CUDA too when torch sees a GPU, so a GPU machine runs the same tests on both with no edits
# (benchmarks/gpu_check.sh selects the cuda forms with `-k cuda`). tests/kernels overrides it:
# a Triton kernel runs either compiled on CUDA or interpreted on the CPU, not both in one session.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
