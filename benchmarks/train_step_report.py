"""The configurations and workloads of benchmarks/train_step.py and its report: the per-configuration
summary of the processes' records (medians and spread), the tables, the ratios against the peers
and the last line (see train_step.py's docstring for what each row and ratio means). Pure functions
of the records: `train_step.py --report-only` reprints them."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

PEFT_CONFIGS = ("peft-recipe", "peft-ckpt-label", "peft-ckpt-label-upcast", "peft-matched-nockpt",
                "peft-matched-nockpt-upcast")
# the PEFT rows computing at qforge's default precision (float32 embeddings, norms, residual stream)
SAME_PRECISION = ("peft-recipe", "peft-ckpt-label-upcast", "peft-matched-nockpt-upcast")
QFORGE_CONFIGS = ("qforge", "qforge-bf16res", "qforge-recompute", "qforge-nockpt", "qforge-lora")
CONFIGS = PEFT_CONFIGS[:1] + QFORGE_CONFIGS[:1] + PEFT_CONFIGS[1:] + QFORGE_CONFIGS[1:]
ALIASES = {"qforge-f32res": "qforge"}  # float32 residual is now qforge's default
PROBE_CONFIG, PEER_ATTENTIONS = "peft-matched-nockpt", ("eager", "sdpa")
WORKLOADS = {  # name: (model, row length or None for the demo rows as they are, batch size)
    "short": ("smollm2", None, 4),
    "rows512": ("smollm2", 512, 2),
    "rows1024": ("smollm2", 1024, 1),
    "tinyllama": ("tinyllama", "tinyllama_seq", 1),
}
RANK, LR = 16, 1e-4


def print_probe(root: Path, workload: str) -> str | None:
    """Print the attention probe's table for `workload` from its records; the faster attention."""
    speeds = {a: sorted(json.loads(f.read_text())["tokens_per_s"] for f in sorted((root / a).glob("*.json")))
              for a in PEER_ATTENTIONS}
    speeds = {a: v for a, v in speeds.items() if v}
    if not speeds:
        return None
    best = max(speeds, key=lambda a: statistics.median(speeds[a]))
    print(f"\n{workload}: the peer's attention, probed with {PROBE_CONFIG} (fresh interleaved processes)")
    print("| attention | processes | tokens/s (median) | spread |\n|---|---:|---:|---|")
    for a, v in speeds.items():
        print(f"| {a}{' (chosen)' if a == best else ''} | {len(v)} | {statistics.median(v):.1f} | {v[0]:.0f}-{v[-1]:.0f} |")
    return best


def summarise(records: list[dict]) -> dict:
    speeds = sorted(r["tokens_per_s"] for r in records)
    peaks = [r["train_peak"] for r in records if r["train_peak"]]
    first = records[0]
    return {**{k: first[k] for k in ("config", "trainable", "adapter_dtype", "residual_dtype", "checkpointing",
                                     "attention", "batch_shape", "tokens_per_step", "label_tokens_per_step")},
            "losses": first["losses"][:3], "n": len(records), "tokens_per_s": statistics.median(speeds),
            "spread": f"{speeds[0]:.0f}-{speeds[-1]:.0f}",
            "step_s": statistics.median(sum(r["step_s"]) / len(r["step_s"]) for r in records),
            "train_peak": statistics.median(peaks) if peaks else None,
            "load_peak": statistics.median(r["load_peak"] for r in records),
            "rss_anon": statistics.median(r["end_rss_anon"] for r in records),
            "train_peak_anon": statistics.median(r.get("train_peak_anon") or 0 for r in records),
            "rss_file": statistics.median(r["end_rss_file"] for r in records),
            "load_s": statistics.median(r["load_s"] for r in records),
            "commits": sorted({r.get("commit", "?") for r in records}),
            "steps": len(first["step_s"]), "same_losses": len({tuple(r["losses"]) for r in records}) == 1}


def ratios(rows: dict, ours: str = "qforge") -> dict:
    """The last line's ratios of `ours` against the peers present in `rows`, and the peers used."""
    def r(a, b, key, invert=False):
        if a not in rows or b not in rows or not rows[a][key] or not rows[b][key]:
            return None
        return rows[b][key] / rows[a][key] if invert else rows[a][key] / rows[b][key]

    def fastest(names):
        names = [c for c in names if c in rows]
        return max(names, key=lambda c: rows[c]["tokens_per_s"]) if names else None
    best = fastest(c for c in PEFT_CONFIGS if c != "peft-recipe")
    same, any_peft = fastest(SAME_PRECISION), fastest(PEFT_CONFIGS)
    return {"qlora_speed_vs_peft": r(ours, "peft-recipe", "tokens_per_s"),
            "qlora_speed_vs_peft_matched": r(ours, best, "tokens_per_s"),
            "qlora_train_mem_vs_peft": r(ours, "peft-recipe", "train_peak"),
            "qlora_vs_lora_step_time": r(ours, "qforge-lora", "tokens_per_s", invert=True),
            "same_config_speed_vs_peft": r(ours, same, "tokens_per_s"),
            "speed_vs_fastest_peft": r(ours, any_peft, "tokens_per_s"),
            "train_mem_rss_vs_same_config_peer": r(ours, same, "train_peak"),
            "train_mem_anon_vs_same_config_peer": r(ours, same, "train_peak_anon"),
            "best_matched": best, "same_config_peer": same, "fastest_peft": any_peft}


OLD_KEYS = ("qlora_speed_vs_peft", "qlora_speed_vs_peft_matched", "qlora_train_mem_vs_peft", "qlora_vs_lora_step_time")


def fmt(q: dict, keys) -> str:
    return " ".join(f"{k}={q[k]:.2f}" if q[k] is not None else f"{k}=n/a" for k in keys)


def same_config_line(workload: str, q: dict) -> str:
    """The line before the last: the same-precision peer, qforge against the fastest peer of any
    precision, and its memory against the same-precision peer's."""
    e = q["speed_vs_fastest_peft"]
    return (f"{workload}: same_config_peer={q['same_config_peer']} speed_vs_fastest_peft="
            f"{'n/a' if e is None else f'{e:.2f}'} ({q['fastest_peft']}) "
            + fmt(q, ("train_mem_rss_vs_same_config_peer", "train_mem_anon_vs_same_config_peer")))


def quality_ratio(path: str | None) -> float:
    """same_config_eval_loss_vs_peft from train_quality.py's result file; nan without one."""
    if not path:
        return float("nan")
    try:
        value = json.loads(Path(path).read_text()).get("same_config_eval_loss_vs_peft")
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"--quality-json {path}: expected train_quality.py's JSON result file ({e})")
    return float("nan") if value is None else float(value)


def report(args) -> None:
    root = Path(args.output_dir) / "runs"
    if not root.is_dir():
        raise SystemExit(f"{root}: no records (run without --report-only first)")
    order = [w for w in WORKLOADS if (root / w).is_dir() and (not args.workload_given or w in args.workloads)]
    heads = []
    for workload in order:
        rows = {}
        for config in CONFIGS:
            files = sorted((root / workload / config).glob("*.json"))
            if files:
                rows[config] = summarise([json.loads(f.read_text()) for f in files])
        if not rows:
            continue
        print_probe(Path(args.output_dir) / "probe" / workload, workload)
        any_row = next(iter(rows.values()))
        model, _, _ = WORKLOADS[workload]
        commits = sorted({c for row in rows.values() for c in row["commits"]})
        print(f"\n### {workload}: {model}, batch {any_row['batch_shape'][0]} x {any_row['batch_shape'][1]} "
              f"(padded), {any_row['tokens_per_step']:.0f} tokens/step ({any_row['label_tokens_per_step']:.0f} "
              f"with a label), r={RANK} all linear, 8-bit AdamW, bf16 autocast; {any_row['steps']} timed steps; "
              f"commit {', '.join(commits)}")
        print("| config | processes | tokens/s (median) | spread | step (s) | train peak RSS (GB) "
              "| train peak RssAnon (GB) | RssFile end (GB) | load peak (GB) | load (s) | trainable | checkpointing | attention "
              "| adapter / residual dtype | first losses | losses alike in every process |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|")
        for c, s in rows.items():
            tp = f"{s['train_peak'] / 1e9:.3f}" if s["train_peak"] else "n/a"
            anon = f"{s['train_peak_anon'] / 1e9:.3f}" if s["train_peak_anon"] else "n/a"
            print(f"| {c} | {s['n']} | {s['tokens_per_s']:.1f} | {s['spread']} | {s['step_s']:.3f} | {tp} "
                  f"| {anon} | {s['rss_file'] / 1e9:.3f} "
                  f"| {s['load_peak'] / 1e9:.3f} | {s['load_s']:.1f} "
                  f"| {s['trainable']:,} | {s['checkpointing']} | {s['attention']} "
                  f"| {s['adapter_dtype']} / {s['residual_dtype']} | {s['losses']} "
                  f"| {'yes' if s['same_losses'] else 'no'} |")
        q = ratios(rows)
        print(f"{workload}: {fmt(q, OLD_KEYS)} (best matched peer: {q['best_matched']})")
        if "qforge-bf16res" in rows:  # the same ratios with the bf16 residual stream on qforge's side
            f = ratios(rows, "qforge-bf16res")
            print(f"{workload}, qforge-bf16res: {fmt(f, OLD_KEYS)} speed_vs_fastest_peft="
                  f"{'n/a' if f['speed_vs_fastest_peft'] is None else format(f['speed_vs_fastest_peft'], '.2f')}")
        line = same_config_line(workload, q)
        print(line)
        heads.append((line, q))
    if not heads:
        raise SystemExit(f"{root}: no records for {args.workloads}")
    line, q = heads[0]
    if len(heads) > 1:  # the first workload's line again, just before the last
        print(line)
    print(f"{fmt(q, OLD_KEYS)} {fmt(q, ('same_config_speed_vs_peft',))} "
          f"same_config_eval_loss_vs_peft={quality_ratio(args.quality_json):.4f}")
