"""The method bench: method settings, the table and figures, the command's settings; and, slow,
the QLoRA paper's finding in small on the embedded model."""
import argparse
import json
import math

import pytest

from qforge.eval import bench
from qforge.train.tasks import demo_task_paths


def record(method, loss, **kw):
    r = {"method": method, "status": "ok", "final_eval_loss": loss, "perplexity": math.exp(loss),
         "eval_curve": [(0, 0.7), (5, loss)], "exact_match": 0.9, "test_rows": 100, "peak_memory_bytes": 1.5e9,
         "tokens_per_second": 60.0, "wall_seconds": 400.0, "artifact": "adapter", "artifact_bytes": 9.8e6}
    r.update(kw)
    return r


def test_each_method_maps_to_its_train_config(tmp_path):
    recipe = bench.default_recipe()
    cfgs = {m: bench.method_config(m, recipe, tmp_path / m) for m in bench.BENCH_METHODS}
    assert (cfgs["qlora"].method, cfgs["qlora"].quant_type, cfgs["qlora"].double_quant) == ("qlora", "nf4", True)
    assert (cfgs["qlora-fp4"].quant_type, cfgs["qlora-fp4"].double_quant) == ("fp4", True)
    assert cfgs["lora"].method == "lora" and cfgs["full"].method == "full"
    assert cfgs["qdora"].use_dora and cfgs["qdora"].method == "qlora"
    assert cfgs["loftq"].loftq_iters == 2 and cfgs["loftq"].method == "qlora"
    assert cfgs["full"].lr == pytest.approx(recipe["lr"] * bench.FULL_LR_SCALE)
    for m, cfg in cfgs.items():  # same data, steps, seed and batch; evaluation runs from on_step
        assert (cfg.max_steps, cfg.seed, cfg.batch_size, cfg.data) == (recipe["max_steps"], 0, 8, recipe["data"])
        assert cfg.eval_every == 0 and cfg.save_every == 0
        assert cfg.optimizer == "paged_adamw_8bit"
    with pytest.raises(ValueError, match="unknown bench method"):
        bench.method_config("qlora-int3", recipe, tmp_path)


def test_exact_match_applies_to_json_answers_only():
    from qforge.train.data import read_jsonl
    assert bench.is_json_task(read_jsonl(demo_task_paths()["test"])[:5])
    assert not bench.is_json_task([{"text": "plain text"}])
    assert not bench.is_json_task([{"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}])
    assert not bench.is_json_task([])


def test_table_and_outputs(tmp_path):
    records = [record("qlora", 0.0169), record("full", 0.02, artifact="model (bf16)", artifact_bytes=269e6),
               {"method": "loftq", "status": "unsupported", "note": bench.UNSUPPORTED_LOFTQ},
               record("lora", 0.0133, exact_match=None, test_rows=0)]
    table = bench.format_table(records)
    lines = table.splitlines()
    assert len(lines) == 2 + len(records)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| qlora | 0.0169 | 1.017 | 90% of 100 | 1.50 | 60 | 400 | 9.8 |" in table
    assert "269.0 (full model, bf16)" in table and "loftq: not supported by the loader yet" in table
    assert "| lora | 0.0133 | 1.013 | n/a |" in table
    bench.write_outputs(records, {"max_steps": 5}, tmp_path, 12.0)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in saved["methods"]] == ["qlora", "full", "loftq", "lora"]
    assert (tmp_path / "bench.md").read_text().strip() == table
    assert (tmp_path / "bench_eval_loss.png").read_bytes()[:4] == b"\x89PNG"


def bench_args(**kw):
    base = dict(config=None, model=None, data=None, eval_data=None, test_data=None, test_rows=None, methods=None,
                max_steps=None, eval_every=None, seed=None, output_dir=None)
    return argparse.Namespace(**{**base, **kw})


def test_command_settings_default_to_the_demo_task_and_all_methods():
    from qforge.commands.bench import bench_settings
    recipe, settings = bench_settings(bench_args())
    paths = demo_task_paths()
    assert recipe["data"] == str(paths["train"]) and recipe["eval_data"] == str(paths["val"])
    assert settings["test_data"] == str(paths["test"]) and settings["methods"] == list(bench.BENCH_METHODS)
    assert recipe["max_steps"] == bench.BENCH_RECIPE["max_steps"] and recipe["output_dir"] == "runs/bench"


def test_command_settings_from_yaml_and_flags(tmp_path):
    from qforge.commands.bench import bench_settings
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    config = tmp_path / "bench.yaml"
    config.write_text("methods: [qlora, lora]\nmax_steps: 7\nlr: 0.0005\ntest_rows: 20\n")
    recipe, settings = bench_settings(bench_args(config=str(config), data=str(data), max_steps=9))
    assert settings["methods"] == ["qlora", "lora"] and settings["test_rows"] == 20
    assert recipe["max_steps"] == 9 and recipe["lr"] == 0.0005  # the flag wins over the YAML
    assert "eval_data" not in recipe and settings["test_data"] is None  # not the demo's splits for other data
    config.write_text("lerning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        bench_settings(bench_args(config=str(config)))


def test_bench_is_a_command():
    from qforge import cli
    assert cli.COMMANDS["bench"][0] == "qforge.commands.bench"


# ---- the QLoRA paper's finding, in small --------------------------------------------------------
# Same recipe, data order, seed and steps (the bench's defaults: 12 steps of batch 8, lr 1e-3) for
# NF4 + double quant, FP4 + double quant and BF16 LoRA; eval loss on the demo task's 100 val rows.
FINDING_STEPS = 12
# NF4 against FP4: the runs are paired (same seed, data order, dropout masks and adapter init), so
# chance moves their ratio little: the paired NF4/LoRA ratio moved by 3% between seeds 0 and 1
# (1.27 and 1.31 at 24 steps). NF4 must not be worse than FP4 by more than that.
NF4_VS_FP4_TOLERANCE = 0.03
# The paper's bar: NF4 + DQ within 2% of BF16 LoRA. It fails on the embedded model, whose weights
# are dequantised Q4_1 values: requantising them to NF4 raises the step-0 eval loss from 0.574
# (BF16) to 0.676, and the gap does not close with training. Measured NF4 / LoRA eval loss:
# 1.27 (24 steps, lr 1e-3), 1.31 (same, seed 1), 1.30 (24 steps, lr 2e-4), 1.37 (60 steps,
# lr 1e-3); LoftQ (2 iterations) ends level with plain NF4 (0.0170 against 0.0169 at 24 steps).
LORA_BAR = 0.02


@pytest.fixture(scope="module")
def finding_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("finding")
    recipe = dict(bench.default_recipe(), max_steps=FINDING_STEPS, eval_every=0)
    losses = {m: bench.run_method(m, recipe, out / m, None, initial_eval=False, log=lambda *_: None)["final_eval_loss"]
              for m in ("qlora", "qlora-fp4", "lora")}
    print(f"\neval loss after {FINDING_STEPS} steps: " + ", ".join(f"{m} {v:.4f}" for m, v in losses.items()))
    return losses


@pytest.mark.slow
def test_nf4_is_no_worse_than_fp4(finding_losses):
    assert finding_losses["qlora"] <= finding_losses["qlora-fp4"] * (1 + NF4_VS_FP4_TOLERANCE), finding_losses


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="NF4 requantisation of the Q4_1-derived embedded weights costs ~30% in "
                                       "eval loss at every lr and step count tried; see the comment above")
def test_nf4_double_quant_is_within_2_percent_of_bf16_lora(finding_losses):
    assert finding_losses["qlora"] <= finding_losses["lora"] * (1 + LORA_BAR), finding_losses
