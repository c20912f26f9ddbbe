import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads TRITON_INTERPRET when it is first imported, and transformers imports it early, so
# the choice is made here, before any test module loads (importing torch and asking it about CUDA
# does not import triton): on a machine whose torch sees a GPU the kernels run compiled (the cuda
# forms of the tests use them, tests/kernels runs on cuda); elsewhere in Triton's CPU interpreter.
# QFORGE_GPU_TESTS=1 (benchmarks/gpu_check.sh) asks for compiled kernels explicitly.
import torch  # noqa: E402

if os.environ.get("QFORGE_GPU_TESTS") != "1" and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
warnings.filterwarnings("ignore", message=".*kernels-community.*")

import pytest  # noqa: E402

# Every test of device-aware code takes its device from the `device` fixture: the CPU always, and
# CUDA too when torch sees a GPU, so a GPU machine runs the same tests on both with no edits
# (benchmarks/gpu_check.sh selects the cuda forms with `-k cuda`). tests/kernels overrides it:
# a Triton kernel runs either compiled on CUDA or interpreted on the CPU, not both in one session.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random Llama folder named 'tiny' (so its model name is 'tiny') with SmolLM2's tokenizer
    (the jobs and command tests serve and train it)."""
    from tests.fixtures import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny")
