"""Preference tuning through the training-run API and `qforge train`: DPO/ORPO runs, --adapter
continuation, --ref-adapter as DPO's reference, the checks before loading, the --method shorthand.
Tiny random Llama (tests/fixtures.py) over the word tokenizer's ChatML template; a run takes seconds."""
import argparse
import json

import pytest
import torch

from qforge.train.config import TrainConfig
from qforge.train.data import DataError
from tests.model.conftest import tiny_dir  # noqa: F401 (a fixture)

PAIRS = [{"input": {"messages": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}]},
          "preferred_output": [{"role": "assistant", "content": f"w{i + 3} w7 w8"}],
          "non_preferred_output": [{"role": "assistant", "content": f"w{i + 5} w9"}]} for i in range(8)]
CHATS = [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"}, {"role": "assistant", "content": f"w{i + 2} w7"}]}
         for i in range(8)]
QUIET = dict(log=lambda *_: None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(tmp_path, model_dir, name, **kw):
    """A recipe on the tiny model: no dropout (step losses are reproducible), float32."""
    base = dict(model=str(model_dir), method="qlora", rank=4, alpha=8, dropout=0.0, batch_size=2, max_seq_len=64,
                max_steps=2, compute_dtype="float32", output_dir=str(tmp_path / name), warmup_steps=0, lr=1e-2,
                keep_base_outputs=False)
    if kw.get("objective", "sft") == "sft":
        base["data"] = str(write_jsonl(tmp_path / "chats.jsonl", CHATS))
    else:
        base["data"] = str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def sft_adapter(tiny_dir, tmp_path_factory):  # noqa: F811
    """An SFT adapter trained 2 steps (no dropout), and the loss its final weights give on the first
    micro-batch of a run with the same data and seed."""
    from qforge.train.loop import micro_batches, collate_rows
    from qforge.train.loss import causal_lm_loss
    from qforge.train.run import prepare

    tmp = tmp_path_factory.mktemp("sft")
    run = prepare(settings(tmp, tiny_dir, "sft"), **QUIET)
    run.train()
    run.save()
    first = micro_batches(len(run.train_set), run.cfg, 1)[0]
    batch = collate_rows([run.train_set[i] for i in first], run.cfg, run.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = float(causal_lm_loss(run.model, batch))
    return tmp / "sft" / "adapter", loss


def first_batch(run):
    from qforge.train.loop import collate_rows, micro_batches
    first = micro_batches(len(run.train_set), run.cfg, run.cfg.max_steps)[0]
    return collate_rows([run.train_set[i] for i in first], run.cfg, run.tokenizer.pad_token_id)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_train_command_runs_preference_and_writes_adapter_and_metrics(tmp_path, tiny_dir, objective):  # noqa: F811
    """`qforge train --method dpo|orpo`: a PEFT adapter, every step's record with TRL's metrics,
    the eval split's metrics, and the final ones in summary.json."""
    from qforge.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "out"
    code = main(["train", "--method", objective, "--model", str(tiny_dir), "--data", str(data), "--rank", "4",
                 "--alpha", "8", "--batch-size", "2", "--max-steps", "2", "--max-seq-len", "64", "--compute-dtype",
                 "float32", "--eval-fraction", "0.25", "--eval-every", "1", "--output-dir", str(out),
                 "--report-to", "none"])
    assert code == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
            assert isinstance(r[key], float), key
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        if objective == "orpo":
            assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == objective and summary["method"] == "qlora"
    assert summary["final_metrics"]["rewards/accuracies"] == recs[-1]["rewards/accuracies"]
    assert summary["final_eval_metrics"]["rewards/margins"] == recs[-1]["eval_rewards/margins"]
    assert (out / "loss.png").stat().st_size > 0


def test_step_zero_loss_is_preference_step_on_the_same_batch(tmp_path, tiny_dir):  # noqa: F811
    from qforge.train.preference import PreferenceConfig, preference_step
    from qforge.train.run import prepare

    run = prepare(settings(tmp_path, tiny_dir, "dpo", objective="dpo", beta=0.2, max_steps=1), **QUIET)
    batch = first_batch(run)
    assert batch["input_ids"].shape[0] == 2 * run.cfg.batch_size  # pairs: chosen then rejected
    run.model.train()  # as the loop runs it
    loss, metrics = preference_step(run.model, batch, PreferenceConfig(method="dpo", beta=0.2))
    run.model.zero_grad(set_to_none=True)
    result = run.train()
    assert result.losses[0] == pytest.approx(float(loss.detach()), rel=1e-6)
    step = records(tmp_path / "dpo")[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert step[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-7)


def test_adapter_continues_from_its_weights_and_its_shape_wins(tmp_path, tiny_dir, sft_adapter):  # noqa: F811
    """--adapter: rank/alpha from its adapter_config.json (over the flags'), and the step-0 SFT loss
    is the loaded adapter's loss on that batch (not a fresh adapter's)."""
    from qforge.train.run import prepare

    folder, loss = sft_adapter
    logged = []
    run = prepare(settings(tmp_path, tiny_dir, "cont", adapter=str(folder), rank=8, alpha=3.0, max_steps=1),
                  log=logged.append)
    assert run.cfg.rank == 4 and run.cfg.alpha == 8
    assert any("adapter_config.json wins" in str(m) and "rank 8 -> 4" in str(m) for m in logged)
    result = run.train()
    assert result.losses[0] == pytest.approx(loss, rel=1e-6)
    fresh = prepare(settings(tmp_path, tiny_dir, "fresh", max_steps=1), **QUIET).train()
    assert abs(fresh.losses[0] - loss) > 1e-3


def test_ref_adapter_is_the_reference(tmp_path, tiny_dir, sft_adapter):  # noqa: F811
    """DPO from the SFT adapter with the SFT adapter as the reference: rewards at step 0 are 0; the
    reference stays frozen and is not saved as the trained adapter; without --ref-adapter the base
    is the reference and the rewards are not 0."""
    from safetensors.torch import load_file

    from qforge.train.run import prepare

    folder = str(sft_adapter[0])
    run = prepare(settings(tmp_path, tiny_dir, "dpo", objective="dpo", adapter=folder, ref_adapter=folder), **QUIET)
    reference = {n: p.detach().clone() for n, p in run.model.named_parameters() if "adapters.reference." in n}
    assert reference and not any(p.requires_grad for n, p in run.model.named_parameters() if n in reference)
    run.train()
    run.save()
    first = records(tmp_path / "dpo")[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # -log sigmoid(0)
    after = dict(run.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in reference.items())
    trained = load_file(str(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors"))
    original = load_file(str(sft_adapter[0] / "adapter_model.safetensors"))
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in trained)  # the trained one, not the reference

    base_ref = prepare(settings(tmp_path, tiny_dir, "dpo_base", objective="dpo", adapter=folder, max_steps=1),
                       **QUIET)
    base_ref.train()
    assert abs(records(tmp_path / "dpo_base")[0]["rewards/chosen"]) > 1e-4


def test_bad_preference_row_fails_before_loading_naming_file_and_line(tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    import qforge.train.run as run_module

    def refuse(*_args, **_kw):
        raise AssertionError("the model was loaded before the checks failed")
    monkeypatch.setattr(run_module, "load_for_method", refuse)
    cfg = settings(tmp_path, tiny_dir, "bad", objective="dpo")
    with open(cfg.data, "a") as f:
        f.write(json.dumps({"input": {"messages": [{"role": "user", "content": "w1"}]},
                            "preferred_output": [{"role": "assistant", "content": "w2"}],
                            "non_preferred_output": [{"role": "user", "content": "w3"}]}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:9: 'non_preferred_output' must end with an assistant"):
        run_module.run_training(cfg, **QUIET)
    with pytest.raises(FileNotFoundError, match=r"adapter folder '.*nowhere' does not exist"):
        run_module.run_training(settings(tmp_path, tiny_dir, "bad2", objective="dpo",
                                         ref_adapter=str(tmp_path / "nowhere")), **QUIET)


def namespace(**given):
    fields = {name: None for name in TrainConfig.field_names()}
    return argparse.Namespace(**{**fields, **given, "config": None})


def test_method_shorthand():
    from qforge.commands.train import config_and_recipe

    cfg, _ = config_and_recipe(namespace(method="dpo", data="x.jsonl", beta=0.3))
    assert (cfg.method, cfg.objective, cfg.beta) == ("qlora", "dpo", 0.3)
    cfg, _ = config_and_recipe(namespace(method="orpo", objective="orpo"))
    assert (cfg.method, cfg.objective) == ("qlora", "orpo")
    with pytest.raises(ValueError, match="--method dpo is --method qlora --objective dpo, but --objective is orpo"):
        config_and_recipe(namespace(method="dpo", objective="orpo"))


@pytest.mark.parametrize("change", [{"method": "lora"}, {"quant_type": "fp4"}, {"quant_type": "hqq4"},
                                    {"objective": "orpo"}])
def test_preference_runs_on_every_base(tmp_path, tiny_dir, change):  # noqa: F811
    """DPO (and ORPO) on a dense base with LoRA, FP4 and HQQ bases: the step-0 loss is preference_step's."""
    from qforge.train.preference import preference_step
    from qforge.train.loop import preference_settings
    from qforge.train.run import prepare

    run = prepare(settings(tmp_path, tiny_dir, "run", **{"objective": "dpo", "max_steps": 1, **change}), **QUIET)
    batch = first_batch(run)
    run.model.train()
    loss, _ = preference_step(run.model, batch, preference_settings(run.cfg))
    run.model.zero_grad(set_to_none=True)
    assert run.train().losses[0] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert "rewards/accuracies" in records(tmp_path / "run")[0]


def test_trackers_log_preference_metrics(tmp_path):
    from qforge.train.tracking import Trackers

    trackers = Trackers(TrainConfig(), tmp_path, targets=[])
    values = trackers.scalars({"step": 1, "loss": 0.6, "lr": 1e-4, "tokens": 10, "elapsed_s": 1.0,
                               "rewards/accuracies": 0.75, "rewards/margins": 0.2, "logps/chosen": -3.0,
                               "nll_loss": 1.5, "eval_loss": 0.7, "eval_rewards/accuracies": 0.5})
    assert values["train/rewards/accuracies"] == 0.75 and values["train/rewards/margins"] == 0.2
    assert values["train/logps/chosen"] == -3.0 and values["train/nll_loss"] == 1.5
    assert values["eval/rewards/accuracies"] == 0.5 and values["eval/loss"] == 0.7


def test_dpo_on_4bit_moe_experts_from_an_sft_adapter(tmp_path):
    """A Mixtral base (4-bit experts with LoRA on them): SFT, then DPO continuing its adapter with it
    as the reference: both adapters reach the experts, rewards start at 0 and the reference's expert
    weights stay frozen."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from qforge.train.run import prepare
    from tests.model.conftest import tiny_tokenizer

    folder = tmp_path / "mixtral"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        tie_word_embeddings=False)).save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    sft = prepare(settings(tmp_path, folder, "sft"), **QUIET)
    sft.train()
    sft.save()
    adapter = str(tmp_path / "sft" / "adapter")
    assert json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())["target_parameters"]
    run = prepare(settings(tmp_path, folder, "dpo", objective="dpo", adapter=adapter, ref_adapter=adapter), **QUIET)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if "adapters.reference." in n}
    assert any("experts" in n for n in frozen)
    run.train()
    first = records(tmp_path / "dpo")[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    params = dict(run.model.named_parameters())
    assert all(torch.equal(params[n], t) and not params[n].requires_grad for n, t in frozen.items())
