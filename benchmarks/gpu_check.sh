#!/usr/bin/env bash
# The one prepared GPU check (an H100/H200-class machine, about 8 minutes, no network).
#
#   bash benchmarks/gpu_check.sh
#
#   1. benchmarks/gpu_bench.py --only dequant: NF4 + double-quant dequantisation bandwidth as a
#      fraction of a device-to-device copy of the output bytes;
#   2. benchmarks/gpu_qlora_8b.py: a random Llama-3.1-8B-shaped model (written once as sharded
#      safetensors under $QFORGE_BENCH_8B_DIR, default /tmp/qforge-llama31-8b-random), QLoRA r=16
#      all-linear, seq 2048, batch 1, gradient checkpointing: qforge against bitsandbytes + PEFT,
#      tokens/s and torch.cuda.max_memory_allocated side by side;
#   3. `qforge demo --device cuda`: its held-out exact-match score after training;
#   4. the test suite on cuda: tests/kernels compiled on the GPU (no interpreter), and every test
#      parametrised by the `device` fixture (tests/conftest.py) in its cuda form (pytest -k cuda).
# Every stage has a time limit; one that fails or runs out reports "failed" and the next still runs.
# The last line is
#   gpu_qlora_speed_vs_peft=A gpu_qlora_mem_vs_peft=B gpu_dequant_vs_copy=C gpu_demo_exact_match=D
# (targets: A >= 1.5, B <= 0.9, C >= 0.85, D >= 0.9). Without a CUDA device it prints one line,
# "no CUDA device: ...", and exits 0. Exit status: 0 when every stage ran, 1 otherwise.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
export QFORGE_GPU_TESTS=1  # tests/conftest.py: Triton compiled, not interpreted; the cuda forms of `device`

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
    echo "no CUDA device: torch sees no GPU here, nothing to check"
    exit 0
fi
echo "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'))"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/qforge-gpu-check.XXXXXX")
SPEED=failed MEM=failed DEQUANT=failed DEMO=failed ok=1
# value NAME FILE: the NAME=value figure of FILE's last line that has it, or "failed".
value() { grep -o "$1=[^ ]*" "$2" 2>/dev/null | tail -n 1 | cut -d= -f2 | grep . || echo failed; }
stage() { echo; echo "######## $1 ($(date -u +%T))"; }

# Stage limits add up to 9 minutes at worst (typical: about 8); the figures come first, the tests last.
stage "1. NF4 dequantisation bandwidth against a device-to-device copy"
timeout 40 "$PY" benchmarks/gpu_bench.py --quick --only dequant 2>&1 | tee "$WORK/dequant.txt"
DEQUANT=$(value dequant_triton_frac_copy "$WORK/dequant.txt")

stage "2. QLoRA on a Llama-3.1-8B-shaped model: qforge vs bitsandbytes + PEFT"
timeout 200 "$PY" benchmarks/gpu_qlora_8b.py --steps 3 2>&1 | tee "$WORK/qlora8b.txt" | grep -v '^RESULT '
SPEED=$(value gpu_qlora_speed_vs_peft "$WORK/qlora8b.txt")
MEM=$(value gpu_qlora_mem_vs_peft "$WORK/qlora8b.txt")

stage "3. qforge demo --device cuda"
timeout 110 "$PY" -m qforge demo --device cuda --skip-fidelity --output-dir "$WORK/demo" 2>&1 | tail -n 25
DEMO=$("$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["exact_match_after"], 3))' \
       "$WORK/demo/summary.json" 2>/dev/null || echo failed)

stage "4. tests on cuda: tests/kernels compiled, then the cuda forms of the device fixture"
KERNEL_TESTS=passed DEVICE_TESTS=passed
timeout 110 "$PY" -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || { ok=0; KERNEL_TESTS=failed; }
timeout 80 "$PY" -m pytest -q -p no:cacheprovider -k cuda --ignore=tests/kernels tests 2>&1 | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || { ok=0; DEVICE_TESTS=failed; }

for v in "$SPEED" "$MEM" "$DEQUANT" "$DEMO"; do
    case "$v" in failed|nan) ok=0 ;; esac
done
echo
echo "tests: tests/kernels on cuda $KERNEL_TESTS; cuda forms of the device-fixture tests $DEVICE_TESTS"
echo "gpu_qlora_speed_vs_peft=$SPEED gpu_qlora_mem_vs_peft=$MEM gpu_dequant_vs_copy=$DEQUANT gpu_demo_exact_match=$DEMO"
[ "$ok" -eq 1 ]
