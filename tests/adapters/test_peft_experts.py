"""LoRA on 4-bit MoE experts against PEFT 0.21's `target_parameters` (the oracle): qforge's files
have PEFT's keys, shapes and config; PEFT loads them onto the dequantised transformers model and
gives the same logits; qforge loads PEFT's own files and gives PEFT's logits."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from qforge.adapters.peft_format import load_adapter, save_adapter
from qforge.model import surgery
from qforge.nn import LoraSpec

from tests.fixtures import MOE_VOCAB as VOCAB
from tests.fixtures import dequantized_moe, quantized_moe, randomise_adapters, tiny_moe

ARCHS = ["mixtral", "qwen3_moe"]
EXPERT_TARGETS = ["experts.down_proj", "experts.gate_up_proj"]
ATOL = 2e-5  # float32 logits of order 1: PEFT adds s*B@A to the weight, qforge adds the low-rank product


def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


@pytest.mark.parametrize("arch", ARCHS + ["qwen2_moe"])
def test_qforge_adapter_loads_in_peft_with_the_same_logits(arch, tmp_path):
    dense = tiny_moe(arch)
    qmodel = quantized_moe(dense)
    # dropout 0.05 trains the linear layers; the file says 0 (PEFT's ParamWrapper refuses any other)
    surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dropout=0.05, dtype=torch.float32))
    randomise_adapters(qmodel)
    qmodel.eval()
    save_adapter(qmodel, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERT_TARGETS and config["lora_dropout"] == 0.0
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")

    # PEFT's own file for the same targets on the dense model: the same keys and shapes
    peft_model = get_peft_model(dequantized_moe(qmodel, dense),
                                LoraConfig(r=4, lora_alpha=8, target_modules=config["target_modules"],
                                           target_parameters=EXPERT_TARGETS))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in ours  # gate_up_proj's [E*r, H]
    assert ours["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4 * 4, 64)

    loaded = PeftModel.from_pretrained(dequantized_moe(qmodel, dense), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), logits(qmodel), rtol=0, atol=ATOL)
    # and the adapter matters: without it the logits move by far more than the tolerance
    surgery.set_active_adapter(qmodel, None)
    assert (logits(qmodel) - logits(loaded)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_on_experts_loads_in_qforge_with_peft_logits(arch, tmp_path):
    dense = tiny_moe(arch)
    qmodel = quantized_moe(dense)
    peft_model = get_peft_model(dequantized_moe(qmodel, dense),
                                LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                           rank_pattern={"gate_up_proj": 8}, alpha_pattern={"down_proj": 2},
                                           init_lora_weights=False))  # random B: the adapter changes the output
    peft_model.eval().save_pretrained(tmp_path / "peft")
    name = load_adapter(qmodel, tmp_path / "peft", name="moe")
    assert name == "moe"
    layer = qmodel.model.layers[1]
    loras = layer.mlp.experts.adapters["moe"]
    assert set(loras) == {"gate_up_proj", "down_proj"}
    assert loras["gate_up_proj"].r == 8 and loras["down_proj"].r == 4 and loras["down_proj"].scaling == 2 / 2
    assert "moe" in layer.self_attn.q_proj.adapters and "moe" not in layer.self_attn.o_proj.adapters
    torch.testing.assert_close(logits(qmodel.eval()), logits(peft_model), rtol=0, atol=ATOL)

    save_adapter(qmodel, tmp_path / "again", name="moe")  # and back: the same tensors PEFT wrote
    before, after = load_file(tmp_path / "peft" / "adapter_model.safetensors"), \
        load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = PeftModel.from_pretrained(dequantized_moe(qmodel, dense), tmp_path / "again").eval()
    torch.testing.assert_close(logits(again), logits(peft_model), rtol=0, atol=ATOL)


def test_only_experts_targeted_and_bad_target_parameters(tmp_path):
    dense = tiny_moe("mixtral")
    qmodel = quantized_moe(dense)
    surgery.add_adapter(qmodel, "default", LoraSpec(r=2, alpha=4, dropout=0.0, dtype=torch.float32,
                                                     target_modules=["experts.down_proj"]))
    randomise_adapters(qmodel)
    assert not any("default" in layer.adapters for _, layer in surgery.adapted_layers(qmodel))
    save_adapter(qmodel, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj"] and config["target_modules"] == []
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.mlp.experts.lora_A.weight" in keys  # no .base_layer: one wrapper
    loaded = PeftModel.from_pretrained(dequantized_moe(qmodel, dense), tmp_path / "a").eval()
    torch.testing.assert_close(logits(loaded), logits(qmodel.eval()), rtol=0, atol=ATOL)

    bad = {**config, "r": 3}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts.down_proj' lora_A has shape \[8, 32\], but "
                                         r"\[4 experts, out=64, in=32\] with r=3 needs \[12, 32\]"):
        load_adapter(quantized_moe(dense), tmp_path / "a")
    config["target_parameters"] = ["mlp.gate.weight"]  # the router: qforge keeps it frozen
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="target_parameters .*only MoE expert parameters"):
        load_adapter(quantized_moe(dense), tmp_path / "a")
    with pytest.raises(ValueError, match="DoRA is not supported on expert parameters"):
        surgery.add_adapter(quantized_moe(dense), "d", LoraSpec(r=2, use_dora=True, dtype=torch.float32))


def test_merged_state_dict_of_an_moe_adapter_is_peft_merge_and_unload(tmp_path):
    from qforge.adapters.merge import adapter_fingerprint, merged_state_dict, requantized_state_dict

    dense = tiny_moe("qwen3_moe")
    qmodel = quantized_moe(dense)
    surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    randomise_adapters(qmodel)
    merged = merged_state_dict(qmodel.eval(), dtype=torch.float32)
    save_adapter(qmodel, tmp_path / "a")
    peft_merged = PeftModel.from_pretrained(dequantized_moe(qmodel, dense), tmp_path / "a").merge_and_unload()
    theirs = peft_merged.state_dict()
    assert merged.keys() == theirs.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], theirs[k], rtol=0, atol=1e-6, msg=k)
    fingerprint = adapter_fingerprint(qmodel)
    with torch.no_grad():
        qmodel.model.layers[0].mlp.experts.adapters["default"]["down_proj"].lora_B[2, 0, 0] += 1
    assert adapter_fingerprint(qmodel) != fingerprint  # the expert weights are part of it
    with pytest.raises(ValueError, match="4-bit MoE experts is not supported"):
        requantized_state_dict(qmodel)


def test_save_merged_moe_folder_loads_in_transformers_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from qforge.adapters.merge import save_merged

    qmodel = quantized_moe(tiny_moe("mixtral"))
    surgery.add_adapter(qmodel, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    randomise_adapters(qmodel)
    save_merged(qmodel.eval(), None, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(qmodel), rtol=0, atol=ATOL)


def test_dense_lora_on_experts_equals_peft_on_the_plain_model(tmp_path):
    """BF16 LoRA's counterpart (here in float32): experts kept dense, the same adapter files."""
    import copy

    dense = tiny_moe("qwen3_moe")
    model = copy.deepcopy(dense)
    surgery.dense_lora_linears(model, surgery.select_targets(surgery.linear_names(model), "all-linear"),
                               compute_dtype=torch.float32)
    assert surgery.dense_lora_experts(model, compute_dtype=torch.float32) == ["model.layers.0.mlp.experts",
                                                                              "model.layers.1.mlp.experts"]
    assert {k for k in model.state_dict() if ".experts." in k} == {k for k in dense.state_dict() if ".experts." in k}
    surgery.add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    randomise_adapters(model)
    save_adapter(model.eval(), tmp_path / "a")
    loaded = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / "a").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=ATOL)
