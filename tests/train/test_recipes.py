"""qforge.train.recipes: Axolotl and LLaMA-Factory configs, written the way those projects' own
examples are (QLoRA on a Llama 3 model), read as qforge recipes; other keys refused by name."""
import json

import pytest
import yaml

from qforge.cli import main
from qforge.train.config import TrainConfig
from qforge.train.recipes import RecipeError, detect_dialect, load_config

# Axolotl's examples/llama-3/qlora.yml shape, its dataset a local file
AXOLOTL_QLORA = """\
base_model: NousResearch/Meta-Llama-3-8B
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

datasets:
  - path: {data}
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/qlora-out

adapter: qlora
lora_model_dir:

sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 2e-4

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""

# LLaMA-Factory's examples/train_qlora/llama3_lora_sft_otfq.yaml shape, one local dataset
LLAMAFACTORY_QLORA = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
quantization_bit: 4
quantization_method: bitsandbytes  # choices: [bitsandbytes (4/8), hqq (2/3/4/5/6/8), eetq (8)]

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: my_chats
dataset_dir: {dataset_dir}
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


@pytest.fixture
def alpaca(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}) + "\n")
    return path


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_axolotl_qlora_example_maps_every_setting(tmp_path, alpaca):
    path = write(tmp_path, AXOLOTL_QLORA.format(data=alpaca))
    assert detect_dialect(yaml.safe_load(path.read_text())) == "axolotl"
    cfg, recipe = load_config(path)
    assert recipe.dialect == "axolotl"
    expected = dict(model="NousResearch/Meta-Llama-3-8B", data=str(alpaca), data_format="instruction",
                    eval_fraction=0.05, output_dir="./outputs/qlora-out", method="qlora", max_seq_len=4096,
                    pack=True, rank=32, alpha=16.0, dropout=0.05, target_modules="all-linear", grad_accum=4,
                    batch_size=2, epochs=4, optimizer="adamw", lr_scheduler="cosine", lr=2e-4,
                    train_on="assistant", compute_dtype="bfloat16", gradient_checkpointing=True, log_every=1,
                    warmup_steps=10, weight_decay=0.0)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.evals_per_epoch, cfg.saves_per_epoch) == (4, 1)
    assert any(n.startswith("flash_attention:") for n in recipe.notes)


def test_llamafactory_qlora_example_maps_every_setting(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "chats.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    (data_dir / "dataset_info.json").write_text(json.dumps(
        {"my_chats": {"file_name": "chats.json", "formatting": "sharegpt"}}))
    path = write(tmp_path, LLAMAFACTORY_QLORA.format(dataset_dir=data_dir))
    cfg, recipe = load_config(path)
    assert recipe.dialect == "llama-factory"
    expected = dict(model="meta-llama/Meta-Llama-3-8B-Instruct", method="qlora", target_modules="all-linear",
                    data=str(data_dir / "chats.json"), data_format="sharegpt", chat_template="llama3",
                    max_seq_len=2048, max_samples=1000, output_dir="saves/llama3-8b/lora/sft", log_every=10,
                    save_every=500, batch_size=1, grad_accum=8, lr=1e-4, epochs=3, lr_scheduler="cosine",
                    warmup_ratio=0.1, compute_dtype="bfloat16", eval_fraction=0.1, eval_every=500,
                    rank=8, alpha=16.0)  # LLaMA-Factory's default rank and alpha (2 x rank)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_command_line_flags_win_over_the_recipe(tmp_path, alpaca):
    path = write(tmp_path, AXOLOTL_QLORA.format(data=alpaca))
    cfg, _ = load_config(path, {"lr": 1e-3, "max_steps": 2})
    assert (cfg.lr, cfg.max_steps, cfg.rank) == (1e-3, 2, 32)


def test_unsupported_keys_are_refused_by_name_with_what_to_do(tmp_path, alpaca):
    text = AXOLOTL_QLORA.format(data=alpaca).replace("deepspeed:", "deepspeed: deepspeed_configs/zero2.json")
    text = text.replace("load_in_8bit: false", "load_in_8bit: true") + "neftune_noise_alpha: 5\nfoo_bar: 1\n"
    with pytest.raises(RecipeError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert "\n" not in message and "recipe.yaml (axolotl recipe): qforge cannot honour 4 setting(s)" in message
    assert "deepspeed (qforge shards the 4-bit base itself: run with --nproc N" in message
    assert "load_in_8bit (qforge's base is 4-bit" in message
    assert "neftune_noise_alpha (not supported)" in message and "foo_bar (not a setting qforge knows" in message


def test_llamafactory_refusals(tmp_path):
    text = LLAMAFACTORY_QLORA.format(dataset_dir=tmp_path).replace("stage: sft", "stage: ppo")
    text = text.replace("quantization_bit: 4", "quantization_bit: 8")
    with pytest.raises(RecipeError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert "stage (qforge trains stage sft or stage dpo (pref_loss sigmoid or orpo); got 'ppo')" in message
    assert "quantization_bit (qforge's quantised base is 4-bit" in message
    assert "dataset ('my_chats' is neither a dataset in" in message


def test_hub_datasets_are_refused_with_what_to_do(tmp_path):
    text = AXOLOTL_QLORA.format(data="tatsu-lab/alpaca")
    with pytest.raises(RecipeError, match=r"datasets \('tatsu-lab/alpaca' is not a local file or folder; "
                                          r"qforge reads local data"):
        load_config(write(tmp_path, text))


def test_qforge_recipes_are_unchanged(tmp_path):
    cfg, recipe = load_config("configs/demo.yaml")
    assert recipe.dialect == "qforge" and cfg == TrainConfig.from_yaml("configs/demo.yaml")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['nonsense'\]"):
        load_config(write(tmp_path, "model: smollm2\nnonsense: 1\n"))


def test_print_config_shows_the_qforge_recipe(tmp_path, alpaca, capsys):
    path = write(tmp_path, AXOLOTL_QLORA.format(data=alpaca))
    assert main(["train", "--config", str(path), "--print-config", "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# qforge recipe from {path} (axolotl)")
    printed = yaml.safe_load(out)
    assert printed["method"] == "qlora" and printed["rank"] == 32 and printed["max_steps"] == 3
    assert TrainConfig(**printed).lr == 2e-4  # the printed recipe is a valid qforge recipe


@pytest.mark.parametrize("name, builtin", [("default", "human_assistant"), ("empty", "empty"), ("alpaca", "alpaca"),
                                           ("vicuna", "vicuna"), ("mistral", "mistral_v3"), ("phi", "phi3")])
def test_llamafactory_template_names_map_to_what_llamafactory_renders(tmp_path, name, builtin):
    text = LLAMAFACTORY_QLORA.format(dataset_dir=tmp_path).replace("dataset: my_chats", f"dataset: {tmp_path}")
    cfg, _ = load_config(write(tmp_path, text.replace("template: llama3", f"template: {name}")))
    assert cfg.chat_template == builtin  # a plain LLaMA-Factory SFT recipe with template: default runs
    with pytest.raises(RecipeError, match=r"template \(LLaMA-Factory template 'zephyr': qforge renders"):
        load_config(write(tmp_path, text.replace("template: llama3", "template: zephyr")))


def test_the_shipped_llamafactory_registry_reads_the_demo_task_through_openai_tags(tmp_path):
    from qforge.train.data import load_rows
    text = LLAMAFACTORY_QLORA.format(dataset_dir="configs").replace("dataset: my_chats", "dataset: demo_task")
    cfg, _ = load_config(write(tmp_path, text))
    rows, fmt = load_rows(cfg.data, cfg.data_format)
    assert fmt == "chat" and rows == load_rows("qforge/data/demo_task/train.jsonl")[0]


def test_the_shipped_axolotl_config_reads_as_qlora_on_sharegpt():
    cfg, recipe = load_config("configs/axolotl-qlora.yaml")
    assert recipe.dialect == "axolotl" and cfg.method == "qlora" and cfg.chat_template == "chatml"
    assert cfg.data == "configs/sharegpt-example.jsonl" and cfg.eval_fraction == 0.1


@pytest.mark.parametrize("line", ["activation_offloading: true", "gradient_checkpointing: offload"])
def test_axolotl_activation_offloading_turns_on_offload_activations(tmp_path, alpaca, line):
    text = AXOLOTL_QLORA.format(data=alpaca)
    text = text.replace("gradient_checkpointing: true", line) if line.startswith("gradient") else text + line + "\n"
    assert line in text
    cfg, _ = load_config(write(tmp_path, text))
    assert cfg.offload_activations is True and cfg.gradient_checkpointing is True
    plain, _ = load_config(write(tmp_path, AXOLOTL_QLORA.format(data=alpaca), name="plain.yaml"))
    assert plain.offload_activations is False
