"""benchmarks/train_quality.py's statistics and report from records (no model is run here): the
Student t interval and the paired per-seed ratio against hand-computed values, the summary rows,
the last line's keys, quality.json's top-level same_config_eval_loss_vs_peft, the resume, and the
TRL rows' order."""
import argparse
import json
import math

import pytest

from benchmarks import train_quality as tq


def test_t_interval_matches_hand_computation():
    assert tq.t_critical(4) == 2.776 and tq.t_critical(1) == 12.706 and tq.t_critical(100) == 2.042
    m, lo, hi = tq.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # s = sqrt(10 / 4) = 1.58114; half width = 2.776 * 1.58114 / sqrt(5) = 1.96293
    assert m == 3.0
    assert lo == pytest.approx(3.0 - 1.96293, abs=1e-5) and hi == pytest.approx(3.0 + 1.96293, abs=1e-5)
    m, lo, hi = tq.mean_ci([0.5, 0.7])  # s = 0.141421; 12.706 * 0.141421 / sqrt(2) = 1.2706
    assert m == pytest.approx(0.6) and hi - m == pytest.approx(1.2706, abs=1e-6)
    m, lo, hi = tq.mean_ci([0.25])
    assert m == 0.25 and math.isnan(lo) and math.isnan(hi)


def test_paired_ratio_uses_only_seeds_both_ran():
    assert tq.paired_ratios({0: 2.0, 1: 3.0, 2: 9.0}, {0: 1.0, 1: 2.0, 3: 5.0}) == [2.0, 1.5]
    assert tq.paired_ratios({0: 1.0}, {1: 1.0}) == []


def record(variant, seed, curve, lr=2e-4):
    return {"variant": variant, "lr": lr, "seed": seed, "eval_curve": curve, "losses": [0.5, 0.4, 0.3, 0.2],
            "unchanged": [], "seconds": 4.0, "step_seconds": 1.0, "adapter_dtype": "float32",
            "residual_dtype": "float32", "batch_size": 4, "steps": 4, "checkpointing": False, "commit": "abc"}


def fake_records():
    peer = {0: 0.020, 1: 0.030, 2: 0.025}
    ours = {0: 0.021, 1: 0.030, 2: 0.0275}  # per-seed ratios 1.05, 1.0, 1.1
    out = []
    for seed in (0, 1, 2):
        out.append(record("peft-bnb-qlora", seed, [[0, 0.67], [4, peer[seed]]]))
        out.append(record("qforge-qlora", seed, [[0, 0.67], [4, ours[seed]]]))
        out.append(record("trl-sft-qlora", seed, [[0, 0.67], [4, 2 * peer[seed]]]))
    return out


def test_summary_rows_hold_mean_interval_and_paired_ratio():
    rows = {(r["variant"], r["step"]): r for r in tq.summarise(fake_records())}
    ours = rows[("qforge-qlora", 4)]
    assert ours["n"] == 3 and ours["pairs"] == 3
    assert ours["mean"] == pytest.approx((0.021 + 0.030 + 0.0275) / 3)
    # ratios 1.05, 1.0, 1.1: mean 1.05, s = 0.05, half width 4.303 * 0.05 / sqrt(3) = 0.124217
    assert ours["ratio_vs_peft"] == pytest.approx(1.05)
    assert ours["ratio_ci"][1] - 1.05 == pytest.approx(0.124217, abs=1e-6)
    assert rows[("peft-bnb-qlora", 4)]["pairs"] == 0                    # the peer is not paired with itself
    assert rows[("trl-sft-qlora", 4)]["ratio_vs_peft"] == pytest.approx(2.0)


def test_report_last_line_and_quality_json(tmp_path, capsys):
    args = argparse.Namespace(batch_size=4)
    tq.report(fake_records(), args, [2e-4], tmp_path)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    keys = dict(kv.split("=") for kv in last.split())
    x = (0.021 + 0.030 + 0.0275) / (0.020 + 0.030 + 0.025)                # ratio of the means
    assert float(keys["eval_loss_vs_peft"]) == pytest.approx(x, abs=1e-4)
    assert keys["same_config_eval_loss_vs_peft"] == keys["eval_loss_vs_peft"]
    lo, hi = (float(v) for v in keys["same_config_eval_loss_ci"].split(".."))
    assert lo == pytest.approx(1.05 - 0.124217, abs=1e-4) and hi == pytest.approx(1.05 + 0.124217, abs=1e-4)
    assert float(keys["trl_eval_loss_vs_peft"]) == pytest.approx(2.0, abs=1e-4)
    assert keys["bf16res_eval_loss_vs_peft"] == "nan"                  # that arm did not run
    data = json.loads((tmp_path / "quality.json").read_text())
    assert data["same_config_eval_loss_vs_peft"] == pytest.approx(x)
    assert (tmp_path / "train_quality.png").stat().st_size > 0


def test_last_line_ratio_of_means_uses_only_seeds_both_arms_ran(tmp_path, capsys):
    records = [r for r in fake_records() if not (r["variant"] == "qforge-qlora" and r["seed"] == 1)]
    tq.report(records, argparse.Namespace(batch_size=4), [2e-4], tmp_path)
    keys = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split())
    # seeds 0 and 2 only: (0.021 + 0.0275) / (0.020 + 0.025) = 1.0778, not the peer's mean over three (0.97)
    assert float(keys["eval_loss_vs_peft"]) == pytest.approx(0.0485 / 0.045, abs=1e-4)


def test_run_matrix_skips_runs_whose_record_exists(tmp_path):
    jobs = [("qforge-qlora", 2e-4, 0), ("peft-bnb-qlora", 2e-4, 0)]
    for v, lr, seed in jobs:
        (tmp_path / tq.run_name(v, lr, seed)).mkdir()
        (tmp_path / tq.run_name(v, lr, seed) / "record.json").write_text("{}")
    args = argparse.Namespace(jobs=2, threads=1, batch_size=4, eval_every=2, no_checkpointing=True)
    assert tq.run_matrix(jobs, 4, args, tmp_path) == []                # nothing launched, nothing failed
    assert not list(tmp_path.glob("*.log"))


def test_trl_rows_follow_the_batch_order(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"u{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tq.trl_rows(path, [[2, 0], [3, 1]])
    assert [r["completion"][0]["content"] for r in out] == ["a2", "a0", "a3", "a1"]
    assert out[0]["prompt"] == rows[2]["messages"][:2]
