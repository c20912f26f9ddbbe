#!/usr/bin/env bash
# The one prepared GPU check (one H100/H200-class GPU, at most about 9 minutes, no network; it is run
# as one command under a 600 s limit).
#
#   bash benchmarks/gpu_check.sh
#
#   0. the random Llama-3.1-8B-shaped checkpoint (~16 GB of sharded bf16 safetensors under
#      $QFORGE_BENCH_8B_DIR, default /tmp/qforge-llama31-8b-random) written once, before any clock
#      and outside every side's time limit (benchmarks/gpu_qlora_8b.py --write-model);
#   1. benchmarks/gpu_bench.py --only dequant: NF4 + double-quant dequantisation bandwidth as a
#      fraction of a device-to-device copy, every path writing into the same preallocated buffer,
#      every weight shape's figure kept;
#   2. benchmarks/gpu_qlora_8b.py --no-write: QLoRA r=16 all-linear, seq 2048, batch 1, gradient
#      checkpointing, two precision-matched pairs (qforge's default, the float32 residual, vs PEFT's
#      prepare_model_for_kbit_training recipe; qforge --residual-dtype bfloat16 vs PEFT without the
#      float32 upcast),
#      each side a fresh process, 3 interleaved repeats (alternating which side goes first), peaks
#      reset after load and warm-up, max allocated and max reserved memory, non-paged 8-bit AdamW
#      on both sides (bitsandbytes' paged state is managed memory max_memory_allocated misses),
#      LoRA dropout 0.05 on both; medians with (min-max) spread;
#   3. `qforge demo --device cuda`: its held-out exact-match score after training;
#   4. the test suite on cuda: tests/kernels compiled on the GPU (no interpreter), and every test
#      parametrised by the `device` fixture (tests/conftest.py) in its cuda form (pytest -k cuda);
#   5. with two GPUs or more (nvidia-smi -L), FSDP-QLoRA sharded across two of them on NCCL:
#      benchmarks/scale.py --device cuda, the embedded model, 3 steps in float32 on one GPU and then
#      on two (torchrun --nproc-per-node 2), each rank's torch.cuda.max_memory_allocated (steps 2..)
#      by component and its loss curve against one GPU's; with fewer GPUs one line says it is skipped
#      and the 8B pairs keep the whole of their time.
# Every stage has its own time limit (the budget is printed first); one that fails or runs out
# reports "failed" and the next still runs. Library versions (torch, CUDA, bitsandbytes, PEFT,
# transformers, triton) and the driver are printed before the first stage. The last line is
#   gpu_qlora_speed_vs_peft_recipe=A gpu_qlora_mem_vs_peft_recipe=B gpu_qlora_bf16res_speed_vs_peft_noupcast=C
#   gpu_qlora_bf16res_mem_vs_peft_noupcast=D gpu_dequant_vs_copy=E gpu_demo_exact_match=F
#   gpu_sharded_peak_2_vs_1=G gpu_sharded_loss_rel_diff=H
# (A, B: qforge's default (float32 residual) vs PEFT's recipe; C, D: the bf16-residual pair; medians of qforge / PEFT
# tokens/s and max_memory_allocated; E the smallest over the weight shapes; G rank 0's peak GPU
# memory on two GPUs over one GPU's, H the largest relative loss difference; both "skipped" with
# fewer than two GPUs). Without a CUDA device
# it prints one line, "no CUDA device: ...", and exits 0. Exit status: 0 when every stage ran, 1 otherwise.
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
SPEED=failed MEM=failed BF16SPEED=failed BF16MEM=failed DEQUANT=failed DEMO=failed ok=1
SHARDED_PEAK=skipped SHARDED_LOSS=skipped
# value NAME FILE: the NAME=value figure of FILE's last line that has it, or "failed".
value() { grep -o "$1=[^ ]*" "$2" 2>/dev/null | tail -n 1 | cut -d= -f2 | grep . || echo failed; }
stage() { echo; echo "######## $1 ($(date -u +%T))"; }

# The budget (seconds, worst case; each stage is stopped at its limit): 90 + 30 + 305 + 75 + 35 + 15 = 550
# (with two GPUs 90 + 30 + 230 + 75 + 35 + 15 + 75 = 550), 9 min 10 s, 50 s under the 600 s command limit. Expected (an estimate: no GPU has run it yet), from a
# per-process estimate of ~45 s (imports ~8, 8B load ~20, 2 arms x 5 steps ~15): 6 x 45 = 270 s for the pairs.
T_WRITE=90 T_DEQUANT=30 T_PAIRS=305 T_DEMO=75 T_KERNEL_TESTS=35 T_DEVICE_TESTS=15
# With two GPUs the sharded stage (5) takes its time from the 8B pairs, whose deadline starts no side
# that would not fit (fewer repeats at worst): the worst case stays 550 s. Expected for stage 5: two
# torchrun launches of ~25 s each (imports ~10, the embedded model from stage 3's cache ~5, 3 steps).
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
T_SHARDED=0
[ "$NGPU" -ge 2 ] && T_SHARDED=75
T_PAIRS=$((T_PAIRS - T_SHARDED))
PAIRS_DEADLINE=$((T_PAIRS - 10)) SIDE_LIMIT=90  # each side process's own limit; none starts unless it fits
echo "budget (s, worst case): write checkpoint $T_WRITE, dequant $T_DEQUANT, 8B pairs $T_PAIRS" \
     "(each side process <= $SIDE_LIMIT, all within $PAIRS_DEADLINE), demo $T_DEMO, kernel tests $T_KERNEL_TESTS," \
     "device tests $T_DEVICE_TESTS, 2-GPU sharded step $T_SHARDED ($NGPU GPU(s));" \
     "total $((T_WRITE + T_DEQUANT + T_PAIRS + T_DEMO + T_KERNEL_TESTS + T_DEVICE_TESTS + T_SHARDED))"
"$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import gpu_qlora_8b; print(gpu_qlora_8b.versions())'
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

stage "0. the random 8B checkpoint, written before any clock starts"
timeout "$T_WRITE" "$PY" benchmarks/gpu_qlora_8b.py --write-model 2>&1 | tail -n 5

stage "1. NF4 dequantisation bandwidth against a device-to-device copy"
timeout "$T_DEQUANT" "$PY" benchmarks/gpu_bench.py --quick --only dequant 2>&1 | tee "$WORK/dequant.txt"
DEQUANT=$(value dequant_triton_frac_copy "$WORK/dequant.txt")

stage "2. QLoRA on a Llama-3.1-8B-shaped model: qforge vs bitsandbytes + PEFT, precision-matched pairs"
timeout "$T_PAIRS" "$PY" benchmarks/gpu_qlora_8b.py --no-write --repeats 3 --steps 3 \
    --side-limit-s "$SIDE_LIMIT" --deadline-s "$PAIRS_DEADLINE" 2>&1 | tee "$WORK/qlora8b.txt" | grep -v '^RESULT '
SPEED=$(value gpu_qlora_speed_vs_peft_recipe "$WORK/qlora8b.txt")
MEM=$(value gpu_qlora_mem_vs_peft_recipe "$WORK/qlora8b.txt")
BF16SPEED=$(value gpu_qlora_bf16res_speed_vs_peft_noupcast "$WORK/qlora8b.txt")
BF16MEM=$(value gpu_qlora_bf16res_mem_vs_peft_noupcast "$WORK/qlora8b.txt")

stage "3. qforge demo --device cuda"
timeout "$T_DEMO" "$PY" -m qforge demo --device cuda --skip-fidelity --output-dir "$WORK/demo" 2>&1 | tail -n 25
DEMO=$("$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["exact_match_after"], 3))' \
       "$WORK/demo/summary.json" 2>/dev/null || echo failed)

stage "4. tests on cuda: tests/kernels compiled, then the cuda forms of the device fixture"
KERNEL_TESTS=passed DEVICE_TESTS=passed
timeout "$T_KERNEL_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || { ok=0; KERNEL_TESTS=failed; }
timeout "$T_DEVICE_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k cuda --ignore=tests/kernels tests 2>&1 | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || { ok=0; DEVICE_TESTS=failed; }

stage "5. FSDP-QLoRA sharded across two GPUs (NCCL) against one GPU"
if [ "$NGPU" -ge 2 ]; then
    timeout "$T_SHARDED" "$PY" benchmarks/scale.py --device cuda --models smollm2 --nprocs 1,2 --steps 3 \
        --work "$WORK/sharded" 2>&1 | tee "$WORK/sharded.txt" | tail -n 20
    SHARDED_PEAK=$(value per_rank_peak_2_vs_1 "$WORK/sharded.txt")
    SHARDED_LOSS=$(value loss_rel_diff_max "$WORK/sharded.txt")
    for v in "$SHARDED_PEAK" "$SHARDED_LOSS"; do
        case "$v" in failed|nan) ok=0 ;; esac
    done
else
    echo "skipped: $NGPU GPU(s) visible; the sharded step needs two"
fi

for v in "$SPEED" "$MEM" "$BF16SPEED" "$BF16MEM" "$DEQUANT" "$DEMO"; do
    case "$v" in failed|nan) ok=0 ;; esac
done
echo
echo "tests: tests/kernels on cuda $KERNEL_TESTS; cuda forms of the device-fixture tests $DEVICE_TESTS"
echo "gpu_qlora_speed_vs_peft_recipe=$SPEED gpu_qlora_mem_vs_peft_recipe=$MEM gpu_qlora_bf16res_speed_vs_peft_noupcast=$BF16SPEED" \
     "gpu_qlora_bf16res_mem_vs_peft_noupcast=$BF16MEM gpu_dequant_vs_copy=$DEQUANT gpu_demo_exact_match=$DEMO" \
     "gpu_sharded_peak_2_vs_1=$SHARDED_PEAK gpu_sharded_loss_rel_diff=$SHARDED_LOSS"
[ "$ok" -eq 1 ]
