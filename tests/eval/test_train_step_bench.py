"""benchmarks/train_step.py's figures from its records: the median over processes, and the four
ratios of its last line defined as issue 15 defines them (no model is run here)."""
import json

from benchmarks import train_step


def record(config, tokens_per_s, train_peak, index=0, losses=(0.5, 0.4, 0.3)):
    return {"config": config, "index": index, "trainable": 10, "adapter_dtype": "float32",
            "residual_dtype": "bfloat16", "checkpointing": "none", "attention": "eager", "batch_shape": [4, 80],
            "tokens_per_step": 300.0, "label_tokens_per_step": 120.0, "losses": list(losses),
            "step_s": [300 / tokens_per_s] * 2, "tokens": [300, 300], "tokens_per_s": tokens_per_s,
            "load_s": 1.0, "load_peak": 2e9, "end_rss_file": 1e8, "train_peak_anon": 9e8, "train_peak": train_peak, "end_rss_anon": 1e9, "commit": "abc"}


def test_summary_is_the_median_process_with_its_spread():
    s = train_step.summarise([record("qforge", v, 1e9 + v, i) for i, v in enumerate((300, 100, 200, 500, 400))])
    assert s["tokens_per_s"] == 300 and s["spread"] == "100-500" and s["n"] == 5
    assert s["train_peak"] == 1e9 + 300 and s["same_losses"]
    s = train_step.summarise([record("qforge", 100, 1e9), record("qforge", 100, 1e9, 1, losses=(0.5, 0.4, 0.2))])
    assert not s["same_losses"]


def test_ratios_follow_the_issue_definitions():
    rows = {c: train_step.summarise([record(c, v, m)]) for c, v, m in (
        ("peft-recipe", 100, 2e9), ("qforge", 250, 1.5e9), ("peft-matched-nockpt", 200, 3e9),
        ("peft-matched-sac", 125, 2.5e9), ("qforge-lora", 275, 2e9))}
    q = train_step.ratios(rows)
    assert q["qlora_speed_vs_peft"] == 2.5                      # A: over the documented recipe
    assert q["qlora_speed_vs_peft_matched"] == 1.25              # B: over the fastest matched peer
    assert q["best_matched"] == "peft-matched-nockpt"
    assert q["qlora_train_mem_vs_peft"] == 0.75                  # C: training-phase peak over the recipe's
    assert q["qlora_vs_lora_step_time"] == 1.1                   # D: step time over BF16 LoRA's
    del rows["qforge-lora"]
    assert train_step.ratios(rows)["qlora_vs_lora_step_time"] is None


def test_report_prints_the_headline_line_last(tmp_path, capsys):
    for config, v, m in (("peft-recipe", 100, 2e9), ("qforge", 250, 1.5e9), ("qforge-lora", 275, 2e9)):
        for workload in ("rows512", "short"):
            path = tmp_path / "runs" / workload / config / "0.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(record(config, v if workload == "short" else v / 2, m)))

    class Args:
        output_dir, workload_given, workloads = str(tmp_path), False, ["short"]
    train_step.report(Args())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == ("qlora_speed_vs_peft=2.50 qlora_speed_vs_peft_matched=n/a qlora_train_mem_vs_peft=0.75 "
                    "qlora_vs_lora_step_time=1.10")
