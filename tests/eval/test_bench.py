"""The method bench: method settings, the table and figures, the command's settings; and, slow,
the QLoRA paper's finding in small on the embedded model."""
import argparse
import json
import math

import pytest

from qforge.eval import bench
from qforge.eval.tasks import demo_task_paths


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
# The paper: NF4 + double quantisation matches 16-bit LoRA (its models: 7B-65B, weights trained in
# 16 bit, close to normally distributed, which NF4's levels are made for), and NF4 beats FP4.
#
# Not on the embedded model: its weights come from a Q4_1 GGUF file, already 4-bit on a uniform
# per-32 grid, and requantising them to NF4 costs 10% in plain-text loss before training (3.44 ->
# 3.79 on 4k tokens of English; FP4 costs 7%, NF4 with blocksize 32 8%). The bench shows it: NF4 /
# BF16 LoRA eval loss 1.27 after 24 steps on the demo task, 1.37 after 60 (`qforge bench`,
# BENCHMARKS.md). So the finding is checked in small on a model whose weights were trained in 16
# bit: a 2-layer Llama (hidden 128, SmolLM2's tokenizer) pretrained here from scratch for 60 steps
# on chats of the demo task's kind (a seed no split uses), then fine-tuned with the bench's recipe
# (12 steps of batch 8, lr 1e-3, same seed and data order) as NF4, FP4 and BF16 LoRA.
# Measured (pretraining loss 2.67): eval loss at step 0, i.e. the quantisation alone: NF4 2.9438,
# FP4 2.9466, BF16 2.9411; after 12 steps (float32 adapters): NF4 2.8838, FP4 2.8810, BF16 LoRA
# 2.8791 (NF4 / LoRA 1.0016; with BF16 adapters it was 2.8839 / 2.8811 / 2.8785). In an earlier
# variant (150 pretraining steps, hidden 256 x 4 layers, loss 1.44): NF4 / LoRA 1.0004, NF4 / FP4
# 0.9987 after training. Where the two 4-bit types' quantisation errors differ by 0.1%, 12 steps
# of training move their order either way (here FP4 ended 0.1% lower).
#
# Why two runs of this test differ at all, and what is asserted: the tiny model is pretrained here,
# 60 steps at lr 3e-3 in BF16 autocast, a chaotic process whose result follows every rounding of
# torch's CPU kernels. On one machine the whole test is deterministic: measured on this project's
# 2-vCPU machine (Xeon with AVX-512 BF16), the pretraining with 1 and with 2 threads ends at
# bit-identical weights (loss 2.668223), and a later run repeated the step-0 losses above (NF4
# 2.94390, FP4 2.94668; the auto keep-base-outputs choice, which depends on free memory, changes
# the roundings of training but not step 0: B is zero there and evaluation runs without
# checkpointing). Another
# machine (another CPU: oneDNN picks AVX2 / AVX-512 / AMX BF16 kernels by instruction set) pretrains
# another model: there NF4 2.8471 vs FP4 2.8460 at step 0, and the first assertion failed. A
# 0.04-0.1% difference between the two 4-bit types' eval losses is inside that variation, so the
# ordering is asserted where the data is unambiguous, on the quantisation error of the model's own
# weights (FP4's mean squared error is 1.73x NF4's here, 1.7-1.8x on normal and on SmolLM2's
# weights in benchmarks/quant_fidelity.py; FP4_VS_NF4_MSE_BAR leaves room), and the eval losses,
# before and after training, within NF4_VS_FP4_LOSS_MARGIN.
FINDING_STEPS = 12
LORA_BAR = 0.02
NF4_VS_FP4_LOSS_MARGIN = 0.005
FP4_VS_NF4_MSE_BAR = 1.3


def pretrain_tiny_llama(folder, steps: int = 60, hidden: int = 128, layers: int = 2, lr: float = 3e-3):
    """A small Llama trained from random in BF16 autocast on chat text, saved with its tokenizer
    as a Hugging Face folder (safetensors) that the bench's loader reads like any model."""
    import torch

    from qforge.eval.tasks import make_task_rows
    from tests.fixtures import smollm2_tokenizer, tiny_llama, vocab_of

    tok = smollm2_tokenizer()
    rows = make_task_rows(n_train=2000, n_val=0, n_test=0, seed=7)["train"]
    stream = torch.tensor([i for r in rows
                           for i in tok(tok.apply_chat_template(r["messages"], tokenize=False),
                                        add_special_tokens=False).input_ids])
    model = tiny_llama(hidden, layers, tied=True, heads=hidden // 32, kv_heads=hidden // 64,
                       intermediate=hidden * 8 // 3 // 8 * 8, max_position_embeddings=512, **vocab_of(tok, "bos", "eos"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, len(stream) - 257, (8,), generator=gen)
        ids = torch.stack([stream[s:s + 256] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - (step + 1) / steps)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return float(loss)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("finding")
    return out, pretrain_tiny_llama(out / "model")


@pytest.fixture(scope="module")
def finding(pretrained):
    out, pretrain_loss = pretrained
    recipe = dict(bench.default_recipe(), model=str(out / "model"), max_steps=FINDING_STEPS, eval_every=0)
    runs = {m: bench.run_method(m, recipe, out / m, None, initial_eval=True, log=lambda *_: None)
            for m in ("qlora", "qlora-fp4", "lora")}
    curves = {m: [loss for _, loss in r["eval_curve"]] for m, r in runs.items()}
    print(f"\npretraining loss {pretrain_loss:.3f}; eval loss (step 0, step {FINDING_STEPS}): {curves}")
    return curves


@pytest.mark.slow
def test_nf4_double_quant_is_within_2_percent_of_bf16_lora(finding):
    final = {m: c[-1] for m, c in finding.items()}
    assert final["qlora"] <= final["lora"] * (1 + LORA_BAR), final
    assert final["qlora"] < finding["qlora"][0] and final["lora"] < finding["lora"][0]  # training did something


def weight_mse(folder, quant_type: str) -> float:
    """Mean squared quantisation error (double quantisation, block 64) over the decoder's linear weights."""
    from safetensors.torch import load_file

    from qforge.quant.fidelity import measure
    weights = [w for k, w in load_file(str(folder / "model.safetensors")).items()
               if ".layers." in k and k.endswith("proj.weight")]
    return sum(measure(quant_type, w, quant_type, True).mse * w.numel() for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.slow
def test_nf4_is_no_worse_than_fp4(pretrained, finding):
    mse = {q: weight_mse(pretrained[0] / "model", q) for q in ("nf4", "fp4")}
    print(f"\nquantisation MSE of the pretrained weights: {mse}")
    assert mse["fp4"] >= FP4_VS_NF4_MSE_BAR * mse["nf4"], mse  # the quantisation alone, where it is clear
    assert finding["qlora"][0] <= finding["qlora-fp4"][0] * (1 + NF4_VS_FP4_LOSS_MARGIN), finding  # step 0
    assert finding["qlora"][-1] <= finding["qlora-fp4"][-1] * (1 + NF4_VS_FP4_LOSS_MARGIN), finding
