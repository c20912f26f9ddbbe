"""The distributed backend follows the run's device: NCCL with one GPU per rank for cuda, gloo for
the CPU (decided from the inputs, so it is tested without a GPU)."""
import pytest

from qforge.dist.group import backend_for


@pytest.mark.parametrize("kind, cuda, expected", [
    ("cuda", True, ("nccl", "cuda")), ("cuda:1", True, ("nccl", "cuda")), ("cpu", True, ("gloo", "cpu")),
    ("auto", True, ("nccl", "cuda")), (None, True, ("nccl", "cuda")), ("auto", False, ("gloo", "cpu")),
    ("cpu", False, ("gloo", "cpu")),
])
def test_backend_for_the_device(kind, cuda, expected):
    assert backend_for(kind, cuda) == expected


def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        backend_for("cuda", False)
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        backend_for("tpu", True)
