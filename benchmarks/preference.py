"""Preference tuning on the demo task: SFT 20 steps, then DPO 20 steps from that adapter, against SFT alone.

    .venv/bin/python benchmarks/preference.py [--steps 20] [--train-rows 160] [--test-rows 100]
        [--batch-size 8] [--beta 0.1] [--dpo-lr 5e-5] [--max-seq-len 128] [--out runs/preference]
    (the same as `qforge bench --preference`)

The task, the phases and the measures are qforge/eval/preference_bench.py's (read its docstring):
pairs built from the demo task (preferred: the right JSON; non-preferred: the same JSON with one
field wrong); SFT on the demo task's first --train-rows train rows (the demo recipe: QLoRA NF4 r16,
lr 1e-3, --batch-size rows per step), then `objective dpo` on the pairs of the same rows, --adapter
and --ref-adapter both SFT's adapter, --batch-size / 2 pairs per step (the same sequences per step).
Each phase runs `qforge.train.run.prepare(cfg)` in its own process.

Held-out (the demo task's test rows: people never trained on): reward accuracy and mean margin
(TRL's definitions, SFT's adapter as the reference), plain preference (log p(right) > log p(wrong)
under the model alone) and greedy exact match, for SFT alone and for SFT+DPO. Writes
OUT/preference.json and OUT/preference.md and prints the table; last line:
reward_accuracy=A mean_margin=M plain_pref_sft=P0 plain_pref_dpo=P1 exact_sft=E0 exact_dpo=E1
peak_ratio=R (DPO's training peak over SFT's). Targets (issue 30): A >= 0.9, M > 0,
P1 >= P0 - 0.05, E1 >= E0 - 0.05.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qforge.eval.preference_bench import DEFAULTS, run_preference_bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(default), default=default,
                            help=f"(default {default})")
    parser.add_argument("--out", default="runs/preference")
    args = vars(parser.parse_args())
    out = args.pop("out")
    report = run_preference_bench(out, log=lambda m: print(m, flush=True), **args)
    print(report["table"])
    print(report["line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
