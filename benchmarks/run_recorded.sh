#!/usr/bin/env bash
# The recorded CPU benchmark runs behind BENCHMARKS.md's training-step, quantisation-speed and
# streaming-load tables, in one go, at one commit, on an IDLE machine (nothing else running:
# the figures are times and speed ratios).
#
#     bash benchmarks/run_recorded.sh [OUT_DIR]      (default runs/recorded-<commit>)
#
# Each stage writes its whole output to OUT_DIR/<stage>.log; OUT_DIR/stages.log gets the start,
# end and load average of each stage and OUT_DIR/train_step_report.log the training-step tables
# of every workload (its last line: qlora_speed_vs_peft=A qlora_speed_vs_peft_matched=B
# qlora_train_mem_vs_peft=C qlora_vs_lora_step_time=D same_config_speed_vs_peft=S
# same_config_eval_loss_vs_peft=L, for the short-row workload; L is read from train_quality.py's
# result file when QUALITY_JSON names it, else nan).
#
# Run time on this project's 2-core CPU when idle: about 25 minutes at 00e844e with 3 and 2
# processes on the long workloads; with 5 on every workload and the serving stage about 50 minutes
# (see the figure beside each stage, and OUT_DIR/stages.log for the real ones). The
# random 1.1B checkpoints (load_memory's under $QFORGE_CACHE/bench, train_step's under
# OUT_DIR/train_step/cache) are written on first use (about 1 minute each) and reused after.
# Stages can be rerun one at a time by copying their line; train_step's records accumulate under
# OUT_DIR/train_step/runs and the last stage reports them all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
COMMIT=$(git rev-parse --short HEAD)
OUT=${1:-runs/recorded-$COMMIT}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "warning: the tree has uncommitted changes; the figures will not belong to commit $COMMIT" | tee -a "$OUT/stages.log"
fi
echo "commit $COMMIT, $(nproc) CPUs, $(date -u '+%F %T UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)" \
  | tee -a "$OUT/stages.log"

stage() {  # stage NAME COMMAND...: run COMMAND, its output to OUT/NAME.log, timings to OUT/stages.log
  local name=$1; shift
  local t0=$SECONDS
  echo "[$(date -u +%T)] $name: start (load $(cut -d' ' -f1 /proc/loadavg)): $*" | tee -a "$OUT/stages.log"
  { echo "# commit $COMMIT, $(date -u '+%F %T UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"; echo "# $*"; } \
    > "$OUT/$name.log"
  "$@" >> "$OUT/$name.log" 2>&1
  echo "[$(date -u +%T)] $name: done in $((SECONDS - t0)) s (load $(cut -d' ' -f1 /proc/loadavg)); last line:" \
    "$(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/stages.log"
}

TS="$PY benchmarks/train_step.py --output-dir $OUT/train_step"
# recipe, the fastest peer of any precision, the fastest checkpointed peer at qforge's precision
# (float32 upcast), qforge, BF16 LoRA. peft-matched-nockpt (no recomputation at all) is assumed the
# fastest peer; if the short-row table names other ones, put those here. Every stage probes the
# peer's attention (eager, sdpa) first: 4 short processes.
FOUR=peft-recipe,peft-matched-nockpt,peft-ckpt-label-upcast,qforge,qforge-lora

# ~1 min: 30 interleaved repeats of every operation, both formats
stage quant_speed $PY benchmarks/quant_speed.py --repeats 30
# ~1.5 min (+1 min the first time: the random 1.1B bf16 checkpoint)
stage load_memory $PY benchmarks/load_memory.py
# ~16 min: the attention probe (4 processes), then all 10 configurations, 5 interleaved processes
# each, 2 warm-up + 6 timed steps
stage train_step_short $TS --workloads short --processes 5 --warmup 2 --steps 6
# ~10 + 10 min: rows of 512 (batch 2) and 1024 tokens (batch 1), five configurations, 5 processes each
stage train_step_rows512 $TS --workloads rows512 --configs $FOUR --processes 5 --warmup 1 --steps 3
stage train_step_rows1024 $TS --workloads rows1024 --configs $FOUR --processes 5 --warmup 1 --steps 3
# ~10 min (+1.5 min the first time: the random TinyLlama-1.1B checkpoint and its quantisation)
stage train_step_tinyllama $TS --workloads tinyllama --tinyllama-seq 256 --configs $FOUR --processes 5 --warmup 1 --steps 3
# every workload's table from the records above; the last line is the short-row workload's
stage train_step_report $TS --report-only ${QUALITY_JSON:+--quality-json "$QUALITY_JSON"}
# ~8 min: multi-adapter serving against one-at-a-time, single-adapter and PEFT's adapter_names= batch,
# every mode best of 3 (serving beside training is its own run: --modes training, BENCHMARKS.md)
stage serve_throughput $PY benchmarks/serve_throughput.py --modes multi,naive,single,peft --repeat 3
echo "all done: $OUT" | tee -a "$OUT/stages.log"
