"""Preference-tuning recipes: Axolotl's `rl: dpo|orpo` and LLaMA-Factory's `stage: dpo` (pref_beta,
pref_loss, dpo_label_smoothing, ref_model, adapter folders) mapped onto TrainConfig, each key that
qforge cannot honour refused by name; the shipped example recipes mapped without training."""
import json

import pytest
import yaml

from qforge.cli import main
from qforge.train.config import TrainConfig
from qforge.train.recipes import RecipeError, load_config

PAIRS = [{"messages": [{"role": "user", "content": "2+2?"}], "chosen": {"role": "assistant", "content": "4"},
          "rejected": {"role": "assistant", "content": "5"}}]

AXOLOTL_DPO = """\
base_model: smollm2
load_in_4bit: true
adapter: qlora
lora_r: 8
lora_target_linear: true
rl: {rl}
datasets:
  - path: {data}
    type: chat_template.default
    field_messages: messages
    field_chosen: chosen
    field_rejected: rejected
micro_batch_size: 2
"""

LLAMAFACTORY_DPO = """\
model_name_or_path: smollm2
quantization_bit: 4
stage: dpo
finetuning_type: lora
dataset: pairs
dataset_dir: {dataset_dir}
template: chatml
"""


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pairs": {
        "file_name": "pairs.jsonl", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    return path


@pytest.fixture
def adapter_dir(tmp_path):
    folder = tmp_path / "sft_adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    return folder


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(tmp_path, text) -> str:
    with pytest.raises(RecipeError) as err:
        load_config(write(tmp_path, text))
    return str(err.value)


# ---- Axolotl --------------------------------------------------------------------------------------
def test_axolotl_rl_dpo_maps_objective_beta_smoothing_and_the_adapter_to_continue(tmp_path, pairs, adapter_dir):
    text = (AXOLOTL_DPO.format(rl="dpo", data=pairs)
            + f"rl_beta: 0.25\ndpo_label_smoothing: 0.1\nlora_model_dir: {adapter_dir}\n")
    cfg, recipe = load_config(write(tmp_path, text))
    assert recipe.dialect == "axolotl"
    assert (cfg.objective, cfg.beta, cfg.label_smoothing, cfg.adapter) == ("dpo", 0.25, 0.1, str(adapter_dir))
    assert (cfg.method, cfg.data, cfg.data_format) == ("qlora", str(pairs), "auto")  # the pair shape is detected
    assert any(n.startswith("rl: qforge trains with objective dpo") for n in recipe.notes)


def test_axolotl_dpo_beta_is_rl_betas_older_name(tmp_path, pairs):
    cfg, _ = load_config(write(tmp_path, AXOLOTL_DPO.format(rl="dpo", data=pairs) + "dpo_beta: 0.3\n"))
    assert cfg.beta == 0.3
    message = refusal(tmp_path, AXOLOTL_DPO.format(rl="dpo", data=pairs) + "dpo_beta: 0.3\nrl_beta: 0.2\n")
    assert "dpo_beta (differs from rl_beta (0.2); give one of them)" in message


def test_axolotl_rl_orpo_takes_orpo_alpha_as_beta(tmp_path, pairs):
    cfg, _ = load_config(write(tmp_path, AXOLOTL_DPO.format(rl="orpo", data=pairs) + "orpo_alpha: 0.05\n"))
    assert (cfg.objective, cfg.beta) == ("orpo", 0.05)


def test_axolotl_preference_refusals_name_the_key(tmp_path, pairs):
    message = refusal(tmp_path, AXOLOTL_DPO.format(rl="kto", data=pairs))
    assert "rl (qforge tunes on preferences with rl: dpo (sigmoid loss) or rl: orpo; got 'kto')" in message
    message = refusal(tmp_path, AXOLOTL_DPO.format(rl="orpo", data=pairs) + "dpo_label_smoothing: 0.1\n")
    assert "dpo_label_smoothing (a DPO setting; ORPO has no reference model" in message
    message = refusal(tmp_path, AXOLOTL_DPO.format(rl="dpo", data=pairs) + "orpo_alpha: 0.1\n")
    assert "orpo_alpha (ORPO's weight, but rl is dpo" in message
    message = refusal(tmp_path, AXOLOTL_DPO.format(rl="dpo", data=pairs).replace("chat_template.default",
                                                                                 "chatml.intel"))
    assert "datasets (preference dataset type 'chatml.intel': qforge reads chat_template.default" in message
    message = refusal(tmp_path, AXOLOTL_DPO.format(rl="dpo", data=pairs) + "rl_adapter_ref_model: true\n")
    assert "rl_adapter_ref_model (qforge's DPO reference is the base with the adapter switched off" in message
    sft = AXOLOTL_DPO.format(rl="dpo", data=pairs).replace("rl: dpo\n", "") + "rl_beta: 0.1\n"
    message = refusal(tmp_path, sft)
    assert "datasets ('chat_template.default' is a preference dataset type; set rl: dpo or rl: orpo)" in message
    assert "rl_beta (a preference-tuning setting, but the recipe trains SFT)" in message
    renamed = AXOLOTL_DPO.format(rl="dpo", data=pairs).replace("field_chosen: chosen", "field_chosen: better")
    assert "datasets[0].field_chosen='better'" in refusal(tmp_path, renamed)


# ---- LLaMA-Factory -----------------------------------------------------------------------------------
def test_llamafactory_stage_dpo_maps_beta_smoothing_and_the_ranking_dataset(tmp_path, pairs):
    text = (LLAMAFACTORY_DPO.format(dataset_dir=tmp_path)
            + "pref_beta: 0.2\npref_loss: sigmoid\ndpo_label_smoothing: 0.05\npref_ftx: 0\n")
    cfg, recipe = load_config(write(tmp_path, text))
    assert recipe.dialect == "llama-factory"
    assert (cfg.objective, cfg.beta, cfg.label_smoothing, cfg.method) == ("dpo", 0.2, 0.05, "qlora")
    assert cfg.data == f"{tmp_path / 'dataset_info.json'}#pairs" and cfg.chat_template == "chatml"
    assert any(n.startswith("dataset: 'pairs' read by its dataset_info.json columns and tags") for n in recipe.notes)


def test_llamafactory_pref_loss_orpo_is_objective_orpo(tmp_path, pairs):
    text = LLAMAFACTORY_DPO.format(dataset_dir=tmp_path) + "pref_loss: orpo\npref_beta: 0.3\n"
    cfg, _ = load_config(write(tmp_path, text))
    assert (cfg.objective, cfg.beta) == ("orpo", 0.3)


def test_llamafactory_ref_model_and_adapters(tmp_path, pairs, adapter_dir):
    base = LLAMAFACTORY_DPO.format(dataset_dir=tmp_path)
    cfg, _ = load_config(write(tmp_path, base + f"ref_model: {adapter_dir}\nadapter_name_or_path: {adapter_dir}\n"))
    assert (cfg.ref_adapter, cfg.adapter) == (str(adapter_dir), str(adapter_dir))
    cfg, recipe = load_config(write(tmp_path, base + f"ref_model: smollm2\nref_model_adapters: {adapter_dir}\n"
                                    "ref_model_quantization_bit: 4\n"))
    assert cfg.ref_adapter == str(adapter_dir)
    assert any(n.startswith("ref_model: the base model is the reference") for n in recipe.notes)
    cfg, _ = load_config(write(tmp_path, base))
    assert cfg.ref_adapter is None  # the base with the adapter off, as TRL does with a PEFT model


def test_llamafactory_preference_refusals_name_the_key(tmp_path, pairs):
    base = LLAMAFACTORY_DPO.format(dataset_dir=tmp_path)
    message = refusal(tmp_path, base + "pref_loss: simpo\npref_ftx: 0.5\nref_model: meta-llama/Llama-3-8B\n")
    assert "pref_loss (qforge has pref_loss sigmoid and orpo (TRL's DPO and ORPO); got 'simpo')" in message
    assert "pref_ftx (DPO plus an SFT term (pref_ftx) is not supported" in message
    assert "ref_model (qforge's reference is the base with the adapter off, or an adapter folder" in message
    message = refusal(tmp_path, base.replace("stage: dpo", "stage: kto"))
    assert "stage (qforge trains stage sft or stage dpo (pref_loss sigmoid or orpo); got 'kto')" in message
    message = refusal(tmp_path, base + "pref_loss: orpo\ndpo_label_smoothing: 0.1\n")
    assert "dpo_label_smoothing (a DPO setting; ORPO has no reference model" in message
    message = refusal(tmp_path, base.replace("stage: dpo", "stage: sft") + "pref_beta: 0.1\n")
    assert "pref_beta (a preference-tuning setting, but the recipe trains SFT)" in message
    assert "dataset (a ranking: true dataset (preference pairs) trains with stage: dpo)" in message
    message = refusal(tmp_path, base + "adapter_name_or_path: a,b\n")
    assert "adapter_name_or_path (qforge continues one adapter" in message


def test_llamafactory_stage_dpo_needs_a_ranking_dataset(tmp_path):
    (tmp_path / "chats.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "chats.jsonl",
                                                                      "formatting": "sharegpt"}}))
    message = refusal(tmp_path, LLAMAFACTORY_DPO.format(dataset_dir=tmp_path))
    assert "dataset (stage dpo trains on a ranking: true dataset)" in message


# ---- the shipped examples ----------------------------------------------------------------------------
@pytest.mark.parametrize("path, dialect", [("configs/axolotl-dpo.yaml", "axolotl"),
                                           ("configs/llamafactory-dpo.yaml", "llama-factory")])
def test_the_shipped_dpo_recipes_map_and_print(path, dialect, capsys):
    cfg, recipe = load_config(path)
    assert recipe.dialect == dialect
    assert (cfg.model, cfg.method, cfg.objective, cfg.beta, cfg.chat_template) == ("smollm2", "qlora", "dpo", 0.1,
                                                                                   "chatml")
    assert (cfg.max_steps, cfg.max_seq_len) == (10, 256)
    assert main(["train", "--config", path, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# qforge recipe from {path} ({dialect})")
    assert TrainConfig(**yaml.safe_load(out)) == cfg  # the printed recipe is the same qforge recipe


def test_the_shipped_dpo_recipes_data_reads_as_preference_pairs():
    from qforge.train.preference_data import load_preference_rows
    for path in ("configs/axolotl-dpo.yaml", "configs/llamafactory-dpo.yaml"):
        cfg, _ = load_config(path)
        rows, _ = load_preference_rows(cfg.data)
        assert len(rows) == 10 and rows[0]["chosen"] == [{"role": "assistant", "content": "Paris."}]
        assert rows[0]["prompt"][0] == {"role": "system", "content": "Answer in one short sentence."}
