#!/usr/bin/env bash
# GPU check for the Triton kernels: (a) tests/kernels compiled on the GPU (no interpreter),
# (b) benchmarks/gpu_bench.py (kernel timings, dequantisation bandwidth against the card's copy
# bandwidth, train-step tokens/s with QFORGE_TRITON=0 / 1 / fused). Extra arguments go to the
# benchmark (e.g. --quick). Without a CUDA device it prints "no CUDA device" and exits 0.
# The last line is the benchmark's name=value figures, with kernel_tests=passed|failed|skipped.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
export QFORGE_GPU_TESTS=1  # tests/conftest.py: run the kernel tests compiled, not interpreted

# The first Python whose torch sees a CUDA device: $PYTHON, the project venv, then the system's.
PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        PY="$candidate"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no CUDA device"
    exit 0
fi
echo "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'))"

tests_rc=0
if "$PY" -c 'import pytest, triton' >/dev/null 2>&1; then
    echo "## tests/kernels on the GPU"
    "$PY" -m pytest -q -p no:cacheprovider tests/kernels
    tests_rc=$?
    if [ "$tests_rc" -eq 0 ]; then QFORGE_KERNEL_TESTS=passed; else QFORGE_KERNEL_TESTS=failed; fi
else
    echo "pytest or triton does not import with $PY: kernel tests skipped"
    QFORGE_KERNEL_TESTS=skipped
fi
export QFORGE_KERNEL_TESTS

"$PY" benchmarks/gpu_bench.py "$@"
bench_rc=$?
if [ "$tests_rc" -ne 0 ]; then exit "$tests_rc"; fi
exit "$bench_rc"
