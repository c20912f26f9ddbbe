"""PEFT 0.21 as the oracle for the adapter files: PEFT loads qforge's files and computes the same
logits on the same (dequantised) base; qforge loads PEFT's files and computes PEFT's logits; bad
files fail with errors that name the file, the layer and the shapes."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qforge.adapters import load_adapter, save_adapter
from qforge.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME

from .conftest import dequantized_base, logits, qforge_with_adapter, quantized_twin, rel_err, tiny_dense

peft = pytest.importorskip("peft")

TOL = 1e-3  # relative logit gap allowed between PEFT and qforge (fp32 both; measured 0.0: same sums)


def peft_load(base, adapter_dir):
    """PeftModel.from_pretrained, failing on any warning PEFT raises about the files."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ours = [w for w in caught if "peft" in w.filename or "adapter" in str(w.message).lower()]
    assert not ours, [str(w.message) for w in ours]
    return model


def peft_adapter(base, out_dir, seed=3, **config):
    """Create, randomise and save an adapter with PEFT itself."""
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude_vector" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval().save_pretrained(str(out_dir))
    return model


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_peft_loads_qforge_adapter_and_gives_the_same_logits(tmp_path, ids, kind):
    dense = tiny_dense()
    qmodel = qforge_with_adapter(dense, use_rslora=kind == "rslora", use_dora=kind == "dora")
    save_adapter(qmodel, tmp_path / "ad", base_model_name_or_path="tiny-llama")
    pmodel = peft_load(dequantized_base(qmodel, dense), tmp_path / "ad")
    ours, theirs = logits(qmodel, ids), logits(pmodel, ids)
    base = logits(quantized_twin(dense), ids)
    assert rel_err(ours, base) > 1e-2  # the adapter matters
    assert rel_err(ours, theirs) < TOL
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    adapter = qmodel.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
    if hasattr(adapter, "spec"):  # the adapter keeps its LoraSpec: the flags are written as given
        assert cfg["use_rslora"] == (kind == "rslora") and cfg["lora_alpha"] == 8
    else:  # otherwise an equivalent plain-LoRA alpha: PEFT's alpha / r is the same scaling
        assert cfg["lora_alpha"] / cfg["r"] == pytest.approx(adapter.scaling)
    assert cfg["use_dora"] == (kind == "dora")
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "tiny-llama"


def test_config_has_exactly_peft_keys_and_values(tmp_path):
    dense = tiny_dense()
    peft_adapter(dequantized_base(quantized_twin(dense), dense), tmp_path / "peft", r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    save_adapter(qforge_with_adapter(dense), tmp_path / "ours")
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert set(ours) == set(theirs)
    theirs["target_modules"] = sorted(theirs["target_modules"])  # PEFT writes a set: any order
    assert ours == theirs
    t_peft, t_ours = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert {k: v.shape for k, v in t_ours.items()} == {k: v.shape for k, v in t_peft.items()}


def test_all_linear_is_written_as_full_paths_like_peft(tmp_path):
    dense = tiny_dense()
    qmodel = qforge_with_adapter(dense, target_modules="all-linear", use_dora=True)
    save_adapter(qmodel, tmp_path / "ours")
    peft_adapter(dequantized_base(quantized_twin(dense), dense), tmp_path / "peft", r=4, lora_alpha=8,
                 target_modules="all-linear", use_dora=True)
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["target_modules"]
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["target_modules"]
    assert ours == sorted(theirs) and "model.layers.0.self_attn.q_proj" in ours and len(ours) == 14
    assert set(load_file(tmp_path / "ours" / WEIGHTS_NAME)) == set(load_file(tmp_path / "peft" / WEIGHTS_NAME))


@pytest.mark.parametrize("kind", ["lora", "dora", "dora-all-linear"])
def test_qforge_loads_peft_adapter_and_gives_peft_logits(tmp_path, ids, kind):
    dense = tiny_dense()
    qmodel = quantized_twin(dense)
    targets = "all-linear" if kind.endswith("all-linear") else ["q_proj", "k_proj", "gate_proj"]
    pmodel = peft_adapter(dequantized_base(qmodel, dense), tmp_path / "peft", r=4, lora_alpha=16,
                          target_modules=targets, use_dora=kind.startswith("dora"))
    name = load_adapter(qmodel, tmp_path / "peft")
    assert name == "peft"  # the folder's name
    ours, theirs = logits(qmodel, ids), logits(pmodel, ids)
    assert rel_err(ours, logits(quantized_twin(dense), ids)) > 1e-2
    assert rel_err(ours, theirs) < TOL


def test_rank_and_alpha_patterns_round_trip_through_peft(tmp_path, ids):
    dense = tiny_dense()
    qmodel = quantized_twin(dense)
    pmodel = peft_adapter(dequantized_base(qmodel, dense), tmp_path / "peft", r=4, lora_alpha=8,
                          target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
                          alpha_pattern={"q_proj": 3})
    load_adapter(qmodel, tmp_path / "peft", name="p")
    assert rel_err(logits(qmodel, ids), logits(pmodel, ids)) < TOL
    save_adapter(qmodel, tmp_path / "back", name="p")
    again = peft_load(dequantized_base(quantized_twin(dense), dense), tmp_path / "back")
    assert rel_err(logits(again, ids), logits(pmodel, ids)) < TOL


def test_save_load_round_trip_in_qforge(tmp_path, ids):
    dense = tiny_dense()
    qmodel = qforge_with_adapter(dense, use_dora=True, alpha=12)
    save_adapter(qmodel, tmp_path / "ad")
    fresh = quantized_twin(dense)
    assert load_adapter(fresh, tmp_path / "ad", name="x") == "x"
    assert rel_err(logits(fresh, ids), logits(qmodel, ids)) < 1e-6
    save_adapter(fresh, tmp_path / "ad2", name="x")
    assert (tmp_path / "ad" / CONFIG_NAME).read_text() == (tmp_path / "ad2" / CONFIG_NAME).read_text()


def test_save_replaces_an_adapter_folder_atomically_and_leaves_no_temp(tmp_path):
    dense = tiny_dense()
    save_adapter(qforge_with_adapter(dense, r=2), tmp_path / "ad")
    save_adapter(qforge_with_adapter(dense, r=8), tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())["r"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="does not look like a folder qforge wrote"):
        save_adapter(qforge_with_adapter(dense), tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# ---- errors -----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    dense = tiny_dense()
    save_adapter(qforge_with_adapter(dense), tmp_path / "ad")
    return dense, tmp_path / "ad"


def _no_adapters(model):
    return all(len(m.adapters) == 0 for m in model.modules() if hasattr(m, "adapters"))


def test_shapes_that_do_not_fit_name_the_layer_and_both_shapes(saved):
    dense, ad = saved
    tensors = load_file(ad / WEIGHTS_NAME)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, str(ad / WEIGHTS_NAME))
    qmodel = quantized_twin(dense)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj.*\[4, 48\].*\[4, 64\]"):
        load_adapter(qmodel, ad)
    assert _no_adapters(qmodel)  # checked before anything was attached


def test_weights_for_layers_the_base_lacks(saved):
    dense, ad = saved  # as if the adapter came from a deeper model: a layer 7 the 2-layer base lacks
    tensors = load_file(ad / WEIGHTS_NAME)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(ad / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"modules the base model does not have: \['model\.layers\.7"):
        load_adapter(quantized_twin(dense), ad)


def test_target_modules_the_base_lacks(saved):
    dense, ad = saved
    cfg = json.loads((ad / CONFIG_NAME).read_text())
    cfg["target_modules"] = ["c_attn"]
    (ad / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no linear layer.*q_proj"):
        load_adapter(quantized_twin(dense), ad)


def test_missing_files_and_malformed_json_name_the_file(saved, tmp_path):
    dense, ad = saved
    qmodel = quantized_twin(dense)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(qmodel, tmp_path / "nowhere")
    (ad / WEIGHTS_NAME).rename(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_adapter(qmodel, ad)
    (ad / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}' is not valid JSON"):
        load_adapter(qmodel, ad)
    (ad / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(qmodel, ad)
    assert _no_adapters(qmodel)


def test_unsupported_settings_and_name_clash(saved):
    dense, ad = saved
    qmodel = quantized_twin(dense)
    load_adapter(qmodel, ad, name="a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        load_adapter(qmodel, ad, name="a")
    cfg = json.loads((ad / CONFIG_NAME).read_text())
    (ad / CONFIG_NAME).write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save .* not supported"):
        load_adapter(qmodel, ad, name="b")
    (ad / CONFIG_NAME).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type is 'IA3'"):
        load_adapter(qmodel, ad, name="b")


def test_save_without_the_adapter_lists_the_ones_present(tmp_path):
    qmodel = qforge_with_adapter(tiny_dense(), name="mine")
    with pytest.raises(ValueError, match=r"no layer .* named 'default'; adapters present: \['mine'\]"):
        save_adapter(qmodel, tmp_path / "ad")
