"""The training-step benchmark at two commits, interleaved: did a change cost speed or memory?

    .venv/bin/python benchmarks/ab_commits.py --before DIR_A --after DIR_B [--processes 3]
        [--output-dir runs/ab] [-- TRAIN_STEP_ARGS ...]

DIR_A and DIR_B are checkouts of qforge (a `git worktree add` of each commit) with a .venv each
(a symlink to one venv is fine: every process runs with PYTHONPATH=its checkout, so it imports
that checkout's qforge, and `benchmarks/train_step.py` of that checkout). Process i of every
configuration runs at the before commit, then at the after commit, then process i+1: machine
drift falls on both sides alike. TRAIN_STEP_ARGS go to train_step.py (default: --workloads short
--configs peft-recipe,qforge,qforge-f32res,qforge-lora); its records are gathered per side under
OUTPUT_DIR/{before,after}/runs/ and each side's own train_step.py prints its tables
(--report-only). The peer's row (peft-recipe, which no qforge change touches) is the control: its
after/before ratio shows how much the machine itself drifted.

Last line: after_vs_before_<config>=R for every configuration (tokens/s medians, after over
before: 1.00 is no change, below 1 a slowdown) and after_vs_before_mem_<config>=M (training-phase
peak RSS medians, after over before).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

SIDES = ("before", "after")
DEFAULT_ARGS = ["--workloads", "short", "--configs", "peft-recipe,qforge,qforge-f32res,qforge-lora"]


def run_side(checkout: Path, out: Path, extra: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(checkout / ".venv" / "bin" / "python"), str(checkout / "benchmarks" / "train_step.py"),
           "--processes", "1", "--output-dir", str(out), *extra]
    subprocess.run(cmd, env=env, check=True)


def gather(part_dirs: list[Path], into: Path) -> None:
    """Copy each part's records (all index 0) into `into`/runs as indices 0, 1, ..."""
    for index, part in enumerate(part_dirs):
        for rec in sorted((part / "runs").glob("*/*/0.json")):
            dest = into / "runs" / rec.parent.parent.name / rec.parent.name / f"{index}.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(rec, dest)


def medians(side_dir: Path) -> dict[str, tuple[float, float, list[float]]]:
    """config -> (median tokens/s, median train peak bytes, every tokens/s), over the gathered records."""
    found: dict[str, list[dict]] = {}
    for rec in (side_dir / "runs").glob("*/*/*.json"):
        found.setdefault(rec.parent.name, []).append(json.loads(rec.read_text()))
    return {cfg: (statistics.median(r["tokens_per_s"] for r in recs),
                  statistics.median(r["train_peak"] or 0 for r in recs),
                  sorted(r["tokens_per_s"] for r in recs)) for cfg, recs in found.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="checkout of the earlier commit (with .venv)")
    ap.add_argument("--after", required=True, help="checkout of the later commit (with .venv)")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per configuration and side (default 3)")
    ap.add_argument("--output-dir", default="runs/ab", help="records per side and process (default runs/ab)")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="after --: arguments for train_step.py")
    args = ap.parse_args()
    extra = [a for a in args.rest if a != "--"] or DEFAULT_ARGS
    out = Path(args.output_dir).resolve()
    checkouts = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    for side, path in checkouts.items():
        if not (path / "benchmarks" / "train_step.py").is_file() or not (path / ".venv" / "bin" / "python").exists():
            raise SystemExit(f"--{side} {path}: expected a qforge checkout with benchmarks/train_step.py and .venv")
    parts: dict[str, list[Path]] = {side: [] for side in SIDES}
    for i in range(args.processes):
        for side in SIDES:
            part = out / side / f"part{i}"
            (out / side / "cache").mkdir(parents=True, exist_ok=True)
            part.mkdir(parents=True, exist_ok=True)
            if not (part / "cache").exists():  # one quantised model and batch file per side
                (part / "cache").symlink_to(out / side / "cache")
            print(f"--- process {i}, {side} ({checkouts[side]})", flush=True)
            run_side(checkouts[side], part, extra)
            parts[side].append(part)
    figures = {}
    for side in SIDES:
        gather(parts[side], out / side)
        print(f"=== {side}: {checkouts[side]}", flush=True)
        subprocess.run([str(checkouts[side] / ".venv" / "bin" / "python"),
                        str(checkouts[side] / "benchmarks" / "train_step.py"), "--report-only",
                        "--output-dir", str(out / side)],
                       env=dict(os.environ, PYTHONPATH=str(checkouts[side])), check=True)
        figures[side] = medians(out / side)
    print(f"{'config':16} {'before tok/s':>13} {'after tok/s':>12} {'ratio':>6} {'before peak GB':>15} "
          f"{'after peak GB':>14}  spread (before | after)")
    last = []
    for cfg in figures["before"]:
        if cfg not in figures["after"]:
            continue
        (sb, mb, allb), (sa, ma, alla) = figures["before"][cfg], figures["after"][cfg]
        print(f"{cfg:16} {sb:13.1f} {sa:12.1f} {sa / sb:6.3f} {mb / 1e9:15.3f} {ma / 1e9:14.3f}  "
              f"{min(allb):.1f}-{max(allb):.1f} | {min(alla):.1f}-{max(alla):.1f}")
        last.append(f"after_vs_before_{cfg}={sa / sb:.3f}")
        if mb:
            last.append(f"after_vs_before_mem_{cfg}={ma / mb:.3f}")
    print(" ".join(last))


if __name__ == "__main__":
    sys.exit(main())
