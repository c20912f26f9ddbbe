"""The statistics and the report of benchmarks/train_quality.py's matrix: Student t intervals, the
paired per-seed ratios to the peer, the summary rows, the tables, the PNG, quality.json and the last
line (see train_quality.py's docstring for what they mean). Pure functions of the runs' records:
`train_quality.py --report` reprints them from a finished or partial run."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

PEER = "peft-bnb-qlora"  # the reference arm: PEFT's documented QLoRA recipe
RANK, ALPHA, DROPOUT = 16, 32, 0.05  # every arm's LoRA settings
# Student t, two-sided 95% (the 0.975 quantile), by degrees of freedom 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """The two-sided 95% Student t quantile for `df` degrees of freedom (df > 30: 2.042, df 30's,
    slightly wide)."""
    if df < 1:
        return float("nan")
    return T975[min(df, len(T975)) - 1]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% Student t interval, mean -+ t(n-1) * s / sqrt(n) with
    s the sample standard deviation (n - 1 in the denominator). One value: the interval is nan."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan"), float("nan")
    s = math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))
    h = t_critical(n - 1) * s / math.sqrt(n)
    return m, m - h, m + h


def paired_ratios(num: dict, den: dict) -> list[float]:
    """num[seed] / den[seed] for every seed both ran (in seed order): arms that share a seed share
    A and the batch order, so the ratio of a pair removes what the seed changes for both."""
    return [num[s] / den[s] for s in sorted(set(num) & set(den))]


def spread(values: list[float]) -> float:
    """(max - min) / mean: the seed-to-seed spread as a share of the mean (0 for one seed)."""
    return (max(values) - min(values)) / (sum(values) / len(values)) if values else float("nan")


def cosine(a: dict, b: dict) -> float:
    import torch
    keys = sorted(a)
    if sorted(b) != keys:
        raise SystemExit(f"the two sides adapt different layers: {sorted(set(a) ^ set(b))[:4]}")
    x = torch.cat([a[k].flatten() for k in keys]).double()  # float32 sums over 10M terms overshoot 1.0
    y = torch.cat([b[k].flatten() for k in keys]).double()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def unchanged_line(record: dict) -> str:
    rows = record["unchanged"]
    if not rows:
        return ""
    pick = [s for s in (1, 2, 3, 5, 10, 25, 50, len(rows)) if s <= len(rows)]
    parts = []
    for s in dict.fromkeys(pick):
        u = rows[s - 1]
        parts.append(f"step {s}: A {u['A'][0] / u['A'][1]:.1%} B {u['B'][0] / u['B'][1]:.1%}")
    later = rows[1:] or rows
    mean_a = sum(u["A"][0] / u["A"][1] for u in later) / len(later)
    mean_b = sum(u["B"][0] / u["B"][1] for u in later) / len(later)
    return "; ".join(parts) + f"; mean over steps 2-{len(rows)}: A {mean_a:.1%} B {mean_b:.1%}"


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}-lr{lr:g}-s{seed}"


def checkpointing_line(check: dict) -> str:
    return (f"gradient checkpointing on / off, {check['variant']} lr {check['lr']:g} seed 0, 3 steps: losses "
            f"{[round(x, 6) for x in check['with']]} / {[round(x, 6) for x in check['without']]}, "
            f"largest relative difference {check['max_rel_diff']:.2e}")


def arm_table(records: list[dict]) -> dict:
    """(variant, lr) -> {step: {seed: eval loss}}."""
    table: dict = {}
    for r in records:
        for step, loss in r["eval_curve"]:
            table.setdefault((r["variant"], r["lr"]), {}).setdefault(step, {})[r.get("seed", 0)] = loss
    return table


def summarise(records: list[dict]) -> list[dict]:
    """One row per (arm, lr, eval step): n, mean, 95% interval, per-seed values, and the paired ratio
    to peft-bnb-qlora (mean and 95% interval of the per-seed ratios) where the peer ran."""
    table = arm_table(records)
    rows = []
    for (v, lr), by_step in table.items():
        for step in sorted(by_step):
            vals = by_step[step]
            m, lo, hi = mean_ci([vals[s] for s in sorted(vals)])
            peer = table.get((PEER, lr), {}).get(step, {})
            rat = paired_ratios(vals, peer) if v != PEER else []
            rm, rlo, rhi = mean_ci(rat)
            rows.append({"variant": v, "lr": lr, "step": step, "n": len(vals), "mean": m, "ci": [lo, hi],
                         "seeds": {str(s): vals[s] for s in sorted(vals)}, "ratio_vs_peft": rm,
                         "ratio_ci": [rlo, rhi], "pairs": len(rat)})
    return rows


def plot(summary: list[dict], lrs: list[float], path: Path) -> None:
    """Eval loss against step, one panel per learning rate: each arm's mean over the seeds, its 95%
    interval as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(lrs), figsize=(7 * len(lrs), 4.8), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for v in dict.fromkeys(r["variant"] for r in summary if r["lr"] == lr):
            rows = [r for r in summary if r["lr"] == lr and r["variant"] == v]
            steps = [r["step"] for r in rows]
            line, = ax.plot(steps, [r["mean"] for r in rows], "o-", ms=3, lw=1.4, label=f"{v} (n={rows[-1]['n']})")
            if all(not math.isnan(r["ci"][0]) for r in rows):
                ax.fill_between(steps, [r["ci"][0] for r in rows], [r["ci"][1] for r in rows],
                                color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("eval loss (log scale)")
        ax.set_title(f"SmolLM2-135M, demo task, lr {lr:g}: mean and 95% interval over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def final_losses(records: list[dict]) -> dict:
    """(variant, lr) -> {seed: final eval loss}."""
    finals: dict = {}
    for r in records:
        finals.setdefault((r["variant"], r["lr"]), {})[r.get("seed", 0)] = r["eval_curve"][-1][1]
    return finals


def fmt_ci(m: float, ci: list[float], digits: int = 4) -> str:
    if math.isnan(ci[0]):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def report(records: list[dict], args, lrs: list[float], out: Path) -> None:
    """Print the tables and the last line, write quality.json and the PNG."""
    import torch
    commits = sorted({r.get("commit", "unknown") for r in records})
    steps = sorted({r.get("steps", len(r["losses"])) for r in records})
    batch = sorted({r.get("batch_size", args.batch_size) for r in records})
    ckpt = sorted({r.get("checkpointing", True) for r in records})
    print(f"\nSmolLM2-135M-Instruct, demo task, {steps} steps of {batch} rows, r={RANK} alpha={ALPHA} "
          f"dropout={DROPOUT}, all linear layers, 8-bit AdamW, bf16 autocast, gradient checkpointing {ckpt}; "
          f"per seed: A init, batch order and dropout masks; same 4-bit base (NF4 + double quant from the float32 "
          f"weights); commits {commits}" + ("  <- NOT ONE COMMIT" if len(commits) > 1 else ""))
    check_path = out / "checkpointing_check.json"
    check = json.loads(check_path.read_text()) if check_path.is_file() else None
    if check:
        print(checkpointing_line(check))
    print("\n| variant | lr | seed | adapter dtype | residual dtype | s/step (CPU s/step) | first losses "
          "| final train loss (mean of last 10) | eval loss by step |")
    print("|---|---:|---:|---|---|---:|---|---:|---|")
    for r in records:
        curve = ", ".join(f"{s}: {e:.4f}" for s, e in r["eval_curve"])
        tail = r["losses"][-10:] or [float("nan")]
        print(f"| {r['variant']} | {r['lr']:g} | {r.get('seed', 0)} | {r['adapter_dtype']} "
              f"| {r.get('residual_dtype', '?')} | {r.get('step_seconds', float('nan')):.2f} "
              f"({r.get('step_cpu_seconds', float('nan')):.2f}) "
              f"| {[round(x, 4) for x in r['losses'][:3]]} | {sum(tail) / len(tail):.4f} | {curve} |")
    print("\nadapter elements a step leaves unchanged (share of all A / B elements):")
    for r in records:
        if r["unchanged"]:
            print(f"  {r['variant']:<22} lr {r['lr']:g} s{r.get('seed', 0)} ({r['adapter_dtype']}): "
                  f"{unchanged_line(r)}")
    summary = summarise(records)
    print("\neval loss over the seeds: mean [95% t interval], each seed's; paired ratio to peft-bnb-qlora = mean "
          "[95% interval] of the per-seed ratios (same seed: same A, same batch order)")
    print("| variant | lr | step | n | mean [95% CI] | per seed | paired ratio vs peft-bnb-qlora [95% CI] |")
    print("|---|---:|---:|---:|---|---|---|")
    for row in summary:
        ratio = fmt_ci(row["ratio_vs_peft"], row["ratio_ci"]) + f" (n={row['pairs']})" if row["pairs"] else "-"
        print(f"| {row['variant']} | {row['lr']:g} | {row['step']} | {row['n']} | {fmt_ci(row['mean'], row['ci'])} "
              f"| {' '.join(f'{x:.4f}' for x in row['seeds'].values())} | {ratio} |")
    finals = final_losses(records)

    def worst(num: str, den: str = PEER) -> tuple[float, float | None]:
        """The larger ratio of the means over the learning rates, and the lr it came from; each mean over
        the seeds both arms have (a partial matrix gives unequal seed sets, which must not be mixed)."""
        pairs = []
        for lr in lrs:
            a, b = finals.get((num, lr), {}), finals.get((den, lr), {})
            common = sorted(set(a) & set(b))
            if common:
                pairs.append((sum(a[s] for s in common) / sum(b[s] for s in common), lr))
        return max(pairs) if pairs else (float("nan"), None)

    firsts = {}
    for r in records:  # the first seed where both sides left first-step gradients (same seed: same A)
        path = out / run_name(r["variant"], r["lr"], r.get("seed", 0)) / "first_grads.pt"
        if path.is_file():
            firsts.setdefault((r["variant"], r["lr"], r.get("seed", 0)), path)
    grad_cos = float("nan")
    for (v, lr, seed), path in firsts.items():
        peer = firsts.get((PEER, lr, seed))
        if v.startswith("qforge-qlora") and peer is not None:
            c = cosine(torch.load(path), torch.load(peer))
            print(f"first-step adapter gradient cosine, {v} vs {PEER} (lr {lr:g}, seed {seed}): {c:.6f}")
            if v == "qforge-qlora" and math.isnan(grad_cos):
                grad_cos = c
    peer_spread = max((spread(list(finals[(PEER, lr)].values())) for lr in lrs if (PEER, lr) in finals),
                      default=float("nan"))
    x, x_lr = worst("qforge-qlora")
    y, _ = worst("qforge-qlora", "qforge-lora")
    trl, _ = worst("trl-sft-qlora")
    bf16res, _ = worst("qforge-qlora-bf16res")
    same_rows = [r for r in summary if r["variant"] == "qforge-qlora" and r["lr"] == x_lr]
    same = max(same_rows, key=lambda r: r["step"]) if same_rows else None  # the final step's paired ratio
    ci = same["ratio_ci"] if same else [float("nan")] * 2
    if records:
        plot(summary, lrs, out / "train_quality.png")
    tmp = out / "quality.json.tmp"
    num = lambda v: None if v is None or math.isnan(v) else v  # noqa: E731 (null, not NaN, for other readers)
    tmp.write_text(json.dumps({
        "same_config_eval_loss_vs_peft": num(x), "same_config_eval_loss_ci": [num(ci[0]), num(ci[1])],
        "eval_loss_vs_peft": num(x), "eval_loss_vs_bf16_lora": num(y), "trl_eval_loss_vs_peft": num(trl),
        "bf16res_eval_loss_vs_peft": num(bf16res), "grad_cosine_vs_peft": num(grad_cos),
        "peft_seed_spread": num(peer_spread), "commits": commits,
        "checkpointing_check": check, "summary": summary, "records": records}))
    os.replace(tmp, out / "quality.json")
    print(f"eval_loss_vs_peft={x:.4f} eval_loss_vs_bf16_lora={y:.4f} grad_cosine_vs_peft={grad_cos:.4f} "
          f"peft_seed_spread={peer_spread:.4f} same_config_eval_loss_vs_peft={x:.4f} "
          f"same_config_eval_loss_ci={ci[0]:.4f}..{ci[1]:.4f} trl_eval_loss_vs_peft={trl:.4f} "
          f"bf16res_eval_loss_vs_peft={bf16res:.4f}")
