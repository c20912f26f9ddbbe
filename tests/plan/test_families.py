"""The model families users name (their shapes against transformers' own parameter count and the
published sizes), Hub spellings of them, and `qforge plan`'s defaults: what a plain `qforge train`
runs (TrainConfig's), on the memory this machine has, with train's optimiser names only."""
import argparse
import json

import pytest

from qforge import cli
from qforge.commands import plan as plan_command
from qforge.plan import as_arch, family_name, load_arch, parameter_count
from qforge.train.config import OPTIMIZERS, QUANT_TYPES, TrainConfig

NEW_FAMILIES = ["mistral-7b", "mistral-nemo-12b", "mixtral-8x7b", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-0.5b",
                "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "qwen3-8b",
                "gemma-2-2b", "gemma-2-9b", "gemma-2-27b"]


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_family_parameter_counts_match_transformers(name):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**load_arch(name)))
    assert parameter_count(as_arch(name)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, low, high", [  # the sizes their model cards publish, in billions
    ("mistral-7b", 7.24, 7.25), ("mixtral-8x7b", 46.7, 46.71), ("qwen2.5-7b", 7.61, 7.62), ("qwen2.5-72b", 72.7, 72.71),
    ("gemma-2-9b", 9.24, 9.25), ("gemma-2-27b", 27.22, 27.23), ("llama-3.2-1b", 1.23, 1.24), ("qwen3-8b", 8.19, 8.2),
])
def test_published_sizes(name, low, high):
    assert low * 1e9 <= parameter_count(as_arch(name)) <= high * 1e9


@pytest.mark.parametrize("spelling, family", [
    ("Mistral-7B-Instruct-v0.3", "mistral-7b"), ("Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("gemma-2-9b-it", "gemma-2-9b"), ("Qwen2.5-7B-Instruct", "qwen2.5-7b"), ("Mixtral-8x22B-v0.1", "mixtral-8x22b"),
    ("LLAMA-3.1-405B", "llama-3.1-405b"), ("SmolLM2-135M-Instruct", "smollm2"), ("no-such-model", "no-such-model"),
])
def test_hub_spellings_name_the_family(spelling, family):
    assert family_name(spelling) == family


def test_an_uncached_hub_id_of_a_family_reads_the_family(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert load_arch("mistralai/Mistral-7B-Instruct-v0.3") == load_arch("mistral-7b")
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        load_arch("someorg/not-a-family")


def test_a_model_folder_is_read(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(load_arch("qwen2.5-0.5b")))
    assert cli.main(["plan", "--model", str(tmp_path), "--gpu", "24GB"]) == 0
    assert "0.49 B parameters, 24 layers, hidden 896" in capsys.readouterr().out


def parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    plan_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_plan_defaults_are_train_defaults():
    args, train = parsed([]), TrainConfig()
    assert (args.model, args.seq_len, args.batch_size, args.rank) == (train.model, train.max_seq_len,
                                                                       train.batch_size, train.rank)
    assert (args.optimizer, args.quant_type, args.hqq_group_size, args.objective) == (
        train.optimizer, train.quant_type, train.hqq_group_size, train.objective)
    assert args.gradient_checkpointing == train.gradient_checkpointing and args.gpu is None


def test_plan_offers_only_the_optimisers_train_takes():
    parser = argparse.ArgumentParser()
    plan_command.add_arguments(parser)
    choices = {a.dest: a.choices for a in parser._actions}
    assert tuple(choices["optimizer"]) == OPTIMIZERS and tuple(choices["quant_type"]) == QUANT_TYPES
    for name in OPTIMIZERS:  # each one train accepts ...
        assert TrainConfig(optimizer=name).optimizer == name  # its __post_init__ refuses the others
    with pytest.raises(SystemExit):  # ... and none it refuses
        parser.parse_args(["--optimizer", "paged_adamw_32bit"])


def test_plain_plan_sizes_a_plain_train_on_this_machine(capsys, monkeypatch):
    import qforge.commands.plan as module

    monkeypatch.setattr(module, "available_memory", lambda device: 7 * 10 ** 9)
    assert cli.main(["plan", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    train = TrainConfig()
    assert out.startswith("smollm2: 0.13 B parameters")
    assert (f"seq_len {train.max_seq_len}, batch {train.batch_size}, rank {train.rank}, {train.optimizer}, "
            "gradient checkpointing on, 7.00 GB of RAM available (this machine; --gpu to plan a card)") in out
    assert f"qforge train with these settings runs {train.method} (its default" in out and "fits in 7 GB" in out


def test_plan_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 512)" in text and "(default 4096)" not in text
    for line in text.split("--")[1:]:
        assert line.count("default") <= 1, line
