"""benchmarks/train_step.py's figures from its records: the median over processes, the ratios of
its last two lines as issues 15 and 27 define them, the attention probe's choice and the
--quality-json read (no model is run here)."""
import json
import math

import pytest

from benchmarks import train_step


def record(config, tokens_per_s, train_peak, index=0, losses=(0.5, 0.4, 0.3), anon=9e8):
    return {"config": config, "index": index, "trainable": 10, "adapter_dtype": "float32",
            "residual_dtype": "bfloat16", "checkpointing": "none", "attention": "eager", "batch_shape": [4, 80],
            "tokens_per_step": 300.0, "label_tokens_per_step": 120.0, "losses": list(losses),
            "step_s": [300 / tokens_per_s] * 2, "tokens": [300, 300], "tokens_per_s": tokens_per_s,
            "load_s": 1.0, "load_peak": 2e9, "end_rss_file": 1e8, "train_peak_anon": anon,
            "train_peak": train_peak, "end_rss_anon": 1e9, "commit": "abc"}


def test_summary_is_the_median_process_with_its_spread():
    s = train_step.summarise([record("qforge", v, 1e9 + v, i) for i, v in enumerate((300, 100, 200, 500, 400))])
    assert s["tokens_per_s"] == 300 and s["spread"] == "100-500" and s["n"] == 5
    assert s["train_peak"] == 1e9 + 300 and s["same_losses"]
    s = train_step.summarise([record("qforge", 100, 1e9), record("qforge", 100, 1e9, 1, losses=(0.5, 0.4, 0.2))])
    assert not s["same_losses"]


ROWS = (("peft-recipe", 100, 2e9, 1.6e9), ("qforge", 250, 1.5e9, 1.2e9), ("peft-matched-nockpt", 200, 3e9, 2.5e9),
        ("peft-ckpt-label", 125, 2.5e9, 2e9), ("peft-ckpt-label-upcast", 160, 2.5e9, 2.4e9),
        ("peft-matched-nockpt-upcast", 150, 3.2e9, 2.8e9), ("qforge-lora", 275, 2e9, 1.7e9))


def test_ratios_follow_the_issue_definitions():
    rows = {c: train_step.summarise([record(c, v, m, anon=a)]) for c, v, m, a in ROWS}
    q = train_step.ratios(rows)
    assert q["qlora_speed_vs_peft"] == 2.5                      # A: over the documented recipe
    assert q["qlora_speed_vs_peft_matched"] == 1.25              # B: over the fastest PEFT row but the recipe
    assert q["best_matched"] == "peft-matched-nockpt"
    assert q["qlora_train_mem_vs_peft"] == 0.75                  # C: training-phase peak over the recipe's
    assert q["qlora_vs_lora_step_time"] == 1.1                   # D: step time over BF16 LoRA's
    # the same precision: the fastest of the upcast rows (and the recipe), not the faster bf16 nockpt row
    assert q["same_config_peer"] == "peft-ckpt-label-upcast"
    assert q["same_config_speed_vs_peft"] == 250 / 160
    assert q["fastest_peft"] == "peft-matched-nockpt" and q["speed_vs_fastest_peft"] == 1.25
    assert q["train_mem_rss_vs_same_config_peer"] == 1.5 / 2.5
    assert q["train_mem_anon_vs_same_config_peer"] == 1.2 / 2.4
    del rows["qforge-lora"], rows["peft-ckpt-label-upcast"], rows["peft-matched-nockpt-upcast"]
    q = train_step.ratios(rows)
    assert q["qlora_vs_lora_step_time"] is None
    assert q["same_config_peer"] == "peft-recipe" and q["same_config_speed_vs_peft"] == 2.5
    del rows["peft-recipe"]
    assert train_step.ratios(rows)["same_config_speed_vs_peft"] is None


def write(tmp_path, sub, workload, name, rec, index=0):
    path = tmp_path / sub / workload / name / f"{index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


class Args:
    workload_given, workloads, quality_json = False, ["short"], None

    def __init__(self, tmp_path, quality_json=None):
        self.output_dir, self.quality_json = str(tmp_path), quality_json


def test_report_prints_the_headline_lines_last(tmp_path, capsys):
    for config, v, m, a in ROWS:
        for workload in ("rows512", "short"):
            write(tmp_path, "runs", workload, config, record(config, v if workload == "short" else v / 2, m, anon=a))
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"same_config_eval_loss_vs_peft": 1.0031, "other": 1}))
    train_step.report(Args(tmp_path, str(quality)))
    *_, before, last = capsys.readouterr().out.strip().splitlines()
    assert before == ("short: same_config_peer=peft-ckpt-label-upcast speed_vs_fastest_peft=1.25 "
                      "(peft-matched-nockpt) train_mem_rss_vs_same_config_peer=0.60 "
                      "train_mem_anon_vs_same_config_peer=0.50")
    assert last == ("qlora_speed_vs_peft=2.50 qlora_speed_vs_peft_matched=1.25 qlora_train_mem_vs_peft=0.75 "
                    "qlora_vs_lora_step_time=1.10 same_config_speed_vs_peft=1.56 same_config_eval_loss_vs_peft=1.0031")


def test_quality_json_without_the_key_or_file_reads_nan(tmp_path):
    assert math.isnan(train_step.quality_ratio(None))
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"eval_loss_vs_peft": 1.05}))
    assert math.isnan(train_step.quality_ratio(str(path)))
    path.write_text("not json")
    with pytest.raises(SystemExit, match="--quality-json"):
        train_step.quality_ratio(str(path))


def test_probe_picks_the_faster_attention_by_median(tmp_path, capsys):
    for i, (eager, sdpa) in enumerate(((300, 280), (250, 290), (310, 285))):
        write(tmp_path, "probe", "short", "eager", record("peft-matched-nockpt", eager, 1e9), i)
        write(tmp_path, "probe", "short", "sdpa", record("peft-matched-nockpt", sdpa, 1e9), i)
    assert train_step.print_probe(tmp_path / "probe" / "short", "short") == "eager"   # medians 300 vs 285
    out = capsys.readouterr().out
    assert "| eager (chosen) | 3 | 300.0 | 250-310 |" in out and "| sdpa | 3 | 285.0 | 280-290 |" in out
    assert train_step.print_probe(tmp_path / "probe" / "rows512", "rows512") is None


def test_the_peers_label_only_loss_is_transformers_loss_and_gradients():
    """peer_label_loss (the LM head on the labelled positions only) against the oracle
    `model(**batch).loss` (the head everywhere): the same value and the same weight gradients,
    with padding and prompt positions unlabelled, to the rounding of float32 sums."""
    import torch

    from tests.fixtures import tiny_llama
    from tests.numerics import grad_atol, sum_atol

    model = tiny_llama(hidden=64, layers=2, vocab=96, tied=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                                   # a padded row
    labels = ids.clone()
    labels[:, :5] = -100                              # prompt
    labels[mask == 0] = -100
    labels[2, 5:8] = -100                             # a hole inside the answer
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = model(**batch, use_cache=False).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1]))
    ours = train_step.peer_label_loss(model, batch)
    hook.remove()
    ours.backward()
    n = int((labels[:, 1:] != -100).sum())
    assert rows == [torch.Size([n])] and n < labels[:, 1:].numel()   # the head ran on the labelled rows only
    torch.testing.assert_close(ours, ref, rtol=0, atol=sum_atol(64 + 96 + n, float(ref.detach())))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=grad_atol(ref_grads[name], 3 * 12 + 96))
