"""`qforge merge --requantize gptq|awq|fp8`: the merged model in the compressed-tensors format.

Oracles: transformers' from_pretrained of our folder (with the compressed-tensors package
installed it validates the config and decompresses the weights with the package's own code) gives
the same float32 logits as qforge's loader of that folder; compressed-tensors' QuantizationConfig
accepts our config; GPTQ and AWQ end with less output error than round-to-nearest on held-out rows.
"""
import argparse
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from qforge import cli
from qforge.adapters import save_adapter, save_merged
from qforge.commands.merge import calibration_source
from qforge.model.compressed import is_compressed_tensors, load_compressed_tensors
from qforge.model.load import load_model, load_quantised_base
from qforge.model.surgery import add_adapter
from qforge.nn import LoraSpec
from qforge.quant.awq import fake_int4
from qforge.quant.int4_groups import group_size_for
from tests.fixtures import tiny_llama

from .conftest import VOCAB, logits, quantized_twin, randomise_adapter, tiny_dense_folder

ct = pytest.importorskip("compressed_tensors")
SCHEMES = ("gptq", "awq", "fp8")


def token_rows(n: int, length: int, seed: int, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for _ in range(n)]


def loud_channels(model, seed: int = 0, factor: float = 8.0, share: int = 16) -> None:
    """A few norm channels much larger than the rest, as trained transformers have (the inputs AWQ
    and GPTQ are designed for: a few salient input channels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                idx = torch.randperm(p.numel(), generator=g)[: p.numel() // share]
                p[idx] *= factor


@pytest.fixture(scope="module")
def merged_model():
    """A 4-bit tiny Llama (hidden 192: groups of 64; intermediate 384: groups of 128) with a random
    adapter on every linear, eval mode."""
    dense = tiny_llama(hidden=192, layers=2, vocab=VOCAB, intermediate=384, heads=4, kv_heads=2, seed=0,
                       initializer_range=0.1).eval()
    loud_channels(dense)
    model = quantized_twin(dense)
    add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.0))
    randomise_adapter(model)
    return model.eval()


@pytest.fixture(scope="module")
def written(merged_model, tmp_path_factory):
    """scheme -> folder (float32 merge) of the three schemes, and the dense merge under 'dense'."""
    root = tmp_path_factory.mktemp("ct")
    calibration = token_rows(32, 32, seed=1)
    out = {"dense": save_merged(merged_model, None, root / "dense", dtype=torch.float32)}
    for scheme in SCHEMES:
        out[scheme] = save_merged(merged_model, None, root / scheme, dtype=torch.float32, requantize=scheme,
                                  calibration=calibration)
    # as shipped: bf16 scales and dense tensors (the dequantised weight exact in float32, then one rounding)
    out["gptq-bf16"] = save_merged(merged_model, None, root / "gptq-bf16", requantize="gptq", calibration=calibration)
    return out


@pytest.mark.parametrize("scheme", [*SCHEMES, "gptq-bf16"])
def test_transformers_and_compressed_tensors_read_our_folder_as_qforge_does(written, scheme):
    folder = written[scheme]
    assert is_compressed_tensors(folder) and not is_compressed_tensors(written["dense"])
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    parsed = ct.QuantizationConfig.model_validate(cfg)  # the package's own schema
    assert parsed.format == ("float-quantized" if scheme == "fp8" else "pack-quantized")
    assert parsed.ignore == ["lm_head"]
    ours = load_compressed_tensors(folder, torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert "model.layers.0.self_attn.q_proj.weight_packed" in theirs.state_dict() or scheme == "fp8"
    ids = torch.tensor(token_rows(2, 9, seed=7))
    # the first forward decompresses the package's modules (its decompression hook)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)
    theirs_sd = theirs.state_dict()
    for key, t in ours.state_dict().items():
        assert torch.equal(t, theirs_sd[key]), key  # the same dequantised weights, bit for bit


def test_stored_tensors_have_the_format_shapes(written):
    from safetensors.torch import load_file
    int4 = load_file(str(written["gptq"] / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert int4[f"{q}.weight_packed"].dtype == torch.int32 and tuple(int4[f"{q}.weight_packed"].shape) == (192, 24)
    assert tuple(int4[f"{q}.weight_scale"].shape) == (192, 3)  # 192 / group 64
    assert int4[f"{q}.weight_shape"].tolist() == [192, 192] and f"{q}.weight" not in int4
    d = "model.layers.0.mlp.down_proj"
    assert tuple(int4[f"{d}.weight_scale"].shape) == (192, 3)  # 384 / group 128
    fp8 = load_file(str(written["fp8"] / "model.safetensors"))
    assert fp8[f"{q}.weight"].dtype == torch.float8_e4m3fn and fp8[f"{q}.weight_scale"].shape == (192, 1)
    assert fp8[f"{q}.weight_scale"].dtype == torch.float32


def rtn_model(dense_folder):
    """The dense merge with every decoder-block linear rounded to nearest int4 (same groups)."""
    model = AutoModelForCausalLM.from_pretrained(str(dense_folder), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.copy_(fake_int4(m.weight, group_size_for(m.in_features), torch.float32))
    return model


def test_gptq_and_awq_beat_round_to_nearest_on_held_out_rows(written):
    held_out = torch.tensor(token_rows(16, 32, seed=99))  # not the calibration rows (seed 1)
    reference = logits(AutoModelForCausalLM.from_pretrained(str(written["dense"]), dtype=torch.float32), held_out)

    def err(model):
        return float((logits(model, held_out) - reference).pow(2).mean() / reference.pow(2).mean())

    rtn = err(rtn_model(written["dense"]))
    gptq = err(load_compressed_tensors(written["gptq"], torch.float32))
    awq = err(load_compressed_tensors(written["awq"], torch.float32))
    fp8 = err(load_compressed_tensors(written["fp8"], torch.float32))
    print(f"relative logits MSE: rtn={rtn:.3e} gptq={gptq:.3e} awq={awq:.3e} fp8={fp8:.3e}")
    assert gptq < 0.8 * rtn and awq < 0.95 * rtn, (rtn, gptq, awq)
    assert fp8 < gptq  # 8 bits per weight against 4


def test_calibration_leaves_the_model_as_it_was(merged_model, tmp_path):
    ids = torch.tensor(token_rows(2, 9, seed=3))
    before = logits(merged_model, ids)
    save_merged(merged_model, None, tmp_path / "awq", requantize="awq", calibration=token_rows(4, 16, seed=2))
    assert torch.equal(logits(merged_model, ids), before)  # stand-ins and norm folds undone


def test_provenance_reports_the_rounding(written):
    for scheme in SCHEMES:
        prov = json.loads((written[scheme] / "qforge_merge.json").read_text())
        assert prov["requantize"] == scheme and prov["requantize_error_over_update"] > 0
    assert json.loads((written["awq"] / "qforge_merge.json").read_text())["awq_alphas"]


def test_gptq_without_calibration_rows_is_a_clear_error(merged_model, tmp_path):
    with pytest.raises(ValueError, match="needs calibration rows"):
        save_merged(merged_model, None, tmp_path / "x", requantize="gptq")
    assert not (tmp_path / "x").exists()


def test_loader_refuses_what_it_does_not_read(written, tmp_path):
    with pytest.raises(ValueError, match="not a compressed-tensors folder"):
        load_compressed_tensors(written["dense"])
    folder = tmp_path / "other"
    folder.mkdir()
    cfg = json.loads((written["fp8"] / "config.json").read_text())
    cfg["quantization_config"]["format"] = "nvfp4-pack-quantized"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'nvfp4-pack-quantized' is not supported"):
        load_compressed_tensors(folder)


# ---- the command ------------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path):
    """(base folder, the 4-bit model with a random adapter, adapter folder in a run folder whose
    config.yaml names its training data)."""
    tiny_dense_folder(tmp_path / "base")
    model, _ = load_model(str(tmp_path / "base"), compute_dtype=torch.float32)
    add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.0))
    randomise_adapter(model)
    run = tmp_path / "run"
    save_adapter(model, run / "adapter")
    data = tmp_path / "train.jsonl"
    rows = token_rows(8, 12, seed=5)
    data.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in r)}) + "\n" for r in rows))
    (run / "config.yaml").write_text(yaml.safe_dump({"quant_type": "nf4", "data": str(data), "max_seq_len": 64}))
    return tmp_path / "base", model.eval(), run / "adapter"


def test_merge_command_writes_gptq_calibrated_on_the_training_data(tmp_path, trained):
    base, _, adapter = trained
    out = tmp_path / "out"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                     "--requantize", "gptq", "--dtype", "float32", "--calibration-rows", "4"]) == 0
    prov = json.loads((out / "qforge_merge.json").read_text())
    assert prov["requantize"] == "gptq" and prov["calibration_rows"] == 4
    ids = torch.tensor(token_rows(2, 9, seed=7))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(load_compressed_tensors(out, torch.float32), ids), logits(theirs, ids),
                               rtol=0, atol=1e-5)


def test_calibration_source_errors_name_the_flag(tmp_path, trained):
    _, _, adapter = trained
    args = argparse.Namespace(requantize="awq", calibration=None, calibration_rows=128, adapter=str(adapter))
    path, fmt, max_len = calibration_source(args)
    assert path.endswith("train.jsonl") and max_len == 64
    (adapter.parent / "config.yaml").write_text(yaml.safe_dump({"quant_type": "nf4"}))
    with pytest.raises(ValueError, match="pass --calibration FILE"):
        calibration_source(args)
    args.calibration = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="--calibration: .*missing.jsonl' not found"):
        calibration_source(args)
    args.calibration_rows = 0
    with pytest.raises(ValueError, match="--calibration-rows must be a positive integer"):
        calibration_source(args)
    assert calibration_source(argparse.Namespace(requantize="fp8", calibration=None, adapter=str(adapter))) is None


def test_merge_command_without_calibration_data_fails_in_one_line(tmp_path, trained, capsys):
    base, _, adapter = trained
    (adapter.parent / "config.yaml").write_text(yaml.safe_dump({"quant_type": "nf4"}))
    rc = cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o"),
                   "--requantize", "awq"])
    err = capsys.readouterr().err
    assert rc == 2 and "--calibration FILE" in err and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_gptq_folder_read_back_by_transformers(tmp_path):
    model, _ = load_quantised_base("smollm2", "cpu")
    add_adapter(model, "default", LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    randomise_adapter(model, std=0.01)
    vocab = model.config.vocab_size
    out = save_merged(model.eval(), None, tmp_path / "gptq", requantize="gptq",
                      calibration=token_rows(4, 32, seed=1, vocab=vocab))
    ids = torch.tensor(token_rows(1, 12, seed=2, vocab=vocab))
    ours = load_compressed_tensors(out, torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-4)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["group_size"] for g in cfg["config_groups"].values()} == {64, 128}  # 576 = 9 x 64


@pytest.mark.parametrize("scheme", ["gptq", "fp8"])
def test_qforge_serve_serves_a_requantised_folder_as_stored(written, scheme, tmp_path):
    """`qforge serve` on our GPTQ / FP8 folder: echo log-probs equal transformers' (with the
    compressed-tensors package) log-softmax on the same folder, in float32."""
    import shutil

    from fastapi.testclient import TestClient

    from qforge.app import ServeConfig, build_server
    from tests.fixtures import smollm2_tokenizer
    folder = tmp_path / scheme
    shutil.copytree(written[scheme], folder)
    smollm2_tokenizer().save_pretrained(str(folder))  # the server needs tokenizer files; prompts are ids < VOCAB
    ids = token_rows(1, 12, seed=11)[0]
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(logits(theirs, torch.tensor([ids]))[0], -1)
    expected = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    app, engine = build_server(ServeConfig(base=str(folder), quant_type="nf4", dtype="float32"))
    try:
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"model": scheme, "prompt": ids, "echo": True, "logprobs": 1,
                                                     "max_tokens": 0})
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None
    # --quant-type nf4 is ignored: a stored-quantised folder is served as stored
    assert (torch.tensor(got[1:]) - expected).abs().max() < 1e-4
