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
