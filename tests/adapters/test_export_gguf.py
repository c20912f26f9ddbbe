"""GGUF export, read back by independent readers: transformers' GGUF loader (`gguf_file=`) must give
the merged model's logits, the `gguf` package's dequantiser must read our Q4_K / Q6_K blocks, and
a LoRA GGUF applied to the base GGUF must give the merged GGUF."""
import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from qforge import cli
from qforge.adapters import read_adapter_config, save_adapter
from qforge.adapters.export_gguf import export_merged_gguf, gguf_name, tensor_type, write_lora_gguf
from qforge.adapters.peft_format import read_adapter_tensors
from qforge.model.surgery import adapted_layers
from qforge.quant.kquants import quantize_q4_k, quantize_q6_k
from tests.fixtures import smollm2_tokenizer, tiny_llama, vocab_of

from .conftest import logits, qforge_with_adapter, quantized_twin, rel_err

T = gguf.GGMLQuantizationType
# Measured on the tiny model below (logits relative to the runtime QLoRA model with its adapter):
# f32 9e-7, f16 7.5e-4, q8_0 2.0e-2, q4_k_m 0.27 (random weights amplify the rounding; the adapter
# itself moves the logits by 0.40).
TOL = {"f32": 1e-5, "f16": 3e-3, "q8_0": 5e-2, "q4_k_m": 0.35}


def rel_mse(y, x):
    return float(((y - x) ** 2).mean() / (x ** 2).mean())


def test_k_quants_read_back_through_the_gguf_dequantiser():
    x = np.random.default_rng(0).standard_normal((16, 768)).astype(np.float32)
    ours = {T.Q4_K: quantize_q4_k(x), T.Q6_K: quantize_q6_k(x)}
    assert ours[T.Q4_K].shape == (16, 3 * 144) and ours[T.Q6_K].shape == (16, 3 * 210)
    err = {t: rel_mse(dequantize(b, t), x) for t, b in ours.items()}
    err.update({t: rel_mse(dequantize(quantize(x, t), t), x) for t in (T.Q4_0, T.Q5_0, T.Q8_0)})
    # 4.5 bits beats Q4_0's 4.5 bits; 6.6 bits sits between Q5_0 (5.5) and Q8_0 (8.5)
    assert err[T.Q4_K] < err[T.Q4_0] and err[T.Q5_0] > err[T.Q6_K] > err[T.Q8_0]
    assert err[T.Q4_K] < 7e-3 and err[T.Q6_K] < 5e-4   # measured 6.1e-3 and 3.7e-4
    # every value lies within half a step of its sub-block's grid (plus fp16 scale rounding)
    y = dequantize(ours[T.Q4_K], T.Q4_K).reshape(-1, 32)
    span = x.reshape(-1, 32).max(1) - np.minimum(x.reshape(-1, 32).min(1), 0)
    assert (np.abs(y - x.reshape(-1, 32)).max(1) <= span / 15 * 0.75 + 1e-3).all()
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(np.zeros((2, 576), np.float32))


def test_names_and_q4_k_m_types_follow_llama_cpp():
    assert gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight" and gguf_name("lm_head.weight") == "output.weight"
    with pytest.raises(ValueError, match="no llama.cpp tensor for 'model.layers.0.foo.weight'"):
        gguf_name("model.layers.0.foo.weight")
    assert tensor_type("output.weight", (100, 512), "q4_k_m", 30) == T.Q6_K
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), "q4_k_m", 30) == T.Q6_K     # a "more bits" layer
    assert tensor_type("blk.0.attn_v.weight", (192, 576), "q4_k_m", 30) == T.Q8_0       # ... whose rows fall back
    assert tensor_type("blk.4.ffn_down.weight", (576, 1536), "q4_k_m", 30) == T.Q4_K     # not a "more bits" layer (5 is)
    assert tensor_type("blk.5.attn_q.weight", (576, 576), "q4_k_m", 30) == T.Q5_0       # 576: llama.cpp's fallback
    assert tensor_type("blk.5.attn_norm.weight", (576,), "q4_k_m", 30) == T.F32


@pytest.fixture(scope="module")
def tiny_model():
    """A random Llama (hidden 256: K-quant rows) over SmolLM2's tokenizer, with an all-linear adapter."""
    tok = smollm2_tokenizer()
    dense = tiny_llama(256, tied=True, initializer_range=0.05, **vocab_of(tok, "bos", "eos")).eval()
    return dense, qforge_with_adapter(dense, target_modules="all-linear", use_rslora=True), tok


def test_transformers_reads_the_export_with_the_merged_logits(tmp_path, tiny_model):
    dense, qmodel, tok = tiny_model
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(7))
    runtime = logits(qmodel, ids)
    assert rel_err(runtime, logits(quantized_twin(dense), ids)) > 0.1   # the adapter matters
    for quant, tol in TOL.items():
        if quant == "f32":
            continue   # the command test below checks f32
        path = export_merged_gguf(qmodel, tok, tmp_path / f"m-{quant}.gguf", quant=quant)
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
        assert rel_err(logits(loaded, ids), runtime) < tol, quant
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "m-q4_k_m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_K and types["blk.0.ffn_down.weight"] == T.Q4_K
    assert types["blk.1.ffn_down.weight"] == T.Q6_K and types["blk.1.attn_v.weight"] == T.Q6_K   # layers >= 7n/8
    assert types["token_embd.weight"] == T.Q4_K and "output.weight" not in types   # tied, as llama.cpp reads it
    # the tokenizer and chat template travel inside the file
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m-f16.gguf")
    chat = [{"role": "user", "content": "Who is Ada?"}]
    assert tok2.chat_template == tok.chat_template
    assert tok2.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert tok2("Hello world, it's 2026!")["input_ids"] == tok("Hello world, it's 2026!")["input_ids"]


def _gguf_arrays(path):
    return {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(path)).tensors}


def test_lora_gguf_on_the_base_gguf_is_the_merged_gguf(tmp_path, tiny_model):
    dense, qmodel, tok = tiny_model
    base = quantized_twin(dense)
    with torch.no_grad():
        zeroed = qforge_with_adapter(dense, target_modules="all-linear")
        for _, layer in adapted_layers(zeroed):
            layer.adapters["default"].lora_B.weight.zero_()
    export_merged_gguf(zeroed, None, tmp_path / "base.gguf", quant="f32")
    export_merged_gguf(qmodel, None, tmp_path / "merged.gguf", quant="f32")
    save_adapter(qmodel, tmp_path / "ad")
    config = read_adapter_config(tmp_path / "ad")
    write_lora_gguf(tmp_path / "lora.gguf", config, read_adapter_tensors(tmp_path / "ad"), base.config, "f32")
    reader = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    w0, w1, lora = _gguf_arrays(tmp_path / "base.gguf"), _gguf_arrays(tmp_path / "merged.gguf"), _gguf_arrays(tmp_path / "lora.gguf")
    adapted = [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]
    assert len(adapted) == 2 * 7
    for n in adapted:
        a, b = lora[n + ".lora_a"], lora[n + ".lora_b"]           # [r, in], [out, r]
        applied = w0[n] + alpha / a.shape[0] * b @ a                # what llama.cpp computes
        assert np.abs(applied - w1[n]).max() < 1e-5 * np.abs(w1[n]).max() + 1e-6, n


def test_lora_gguf_refuses_dora(tmp_path, tiny_model):
    dense, _, _ = tiny_model
    save_adapter(qforge_with_adapter(dense, use_dora=True), tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA adapters have no llama.cpp LoRA form"):
        write_lora_gguf(tmp_path / "x.gguf", read_adapter_config(tmp_path / "dora"),
                        read_adapter_tensors(tmp_path / "dora"), dense.config)
    assert not (tmp_path / "x.gguf").exists()


def test_export_command_writes_gguf_modelfile_and_card(tmp_path, tiny_model, capsys):
    dense, qmodel, tok = tiny_model
    dense.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    save_adapter(qmodel, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    out = tmp_path / "out" / "tiny.gguf"
    argv = ["export", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), "--out", str(out)]
    assert cli.main(argv + ["--quant", "f32"]) == 0
    assert "qforge export: wrote" in capsys.readouterr().out
    ids = torch.randint(0, len(tok), (1, 7), generator=torch.Generator().manual_seed(3))
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    assert rel_err(logits(loaded, ids), logits(qmodel, ids)) < 1e-5
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    card = (out.parent / "README.md").read_text()
    assert f"base_model: {tmp_path / 'base'}" in card and "library_name: gguf" in card and "rsLoRA" in card
    assert cli.main(argv[:-1] + [str(tmp_path / "ad.gguf"), "--format", "gguf-lora"]) == 0
    assert {t.name for t in gguf.GGUFReader(str(tmp_path / "ad.gguf")).tensors} >= {"blk.0.attn_q.weight.lora_a"}
    capsys.readouterr()  # what the loads above wrote
    with pytest.raises(SystemExit) as refused:  # argparse's choices: one line, status 2
        cli.main(argv + ["--quant", "q3"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--quant: invalid choice: 'q3'" in err and len(err.strip().splitlines()) == 1
    assert cli.main(argv[:-1] + [str(tmp_path / "x.bin")]) == 2


@pytest.mark.slow
def test_smollm2_export_matches_the_runtime_model(tmp_path):
    """The embedded model with a small adapter: q8_0 export read by transformers vs qforge's runtime."""
    from qforge.model.load import load_model
    from qforge.model.surgery import add_adapter
    from qforge.nn import LoraSpec

    from .conftest import randomise_adapter

    model, tok = load_model("smollm2", compute_dtype=torch.float32)
    add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32,
                                           target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    randomise_adapter(model, std=0.02)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="smollm2")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    out = tmp_path / "smol.gguf"
    assert cli.main(["export", "--base", "smollm2", "--adapter", str(tmp_path / "ad"), "--out", str(out),
                     "--quant", "q8_0"]) == 0
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    runtime = logits(model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    exported = logits(loaded, ids)
    # measured: f32 2.7e-6, f16 1.6e-3, q8_0 3.5e-2 to 5.3e-2 (30 layers amplify Q8_0's 0.5% weight error)
    assert rel_err(exported, runtime) < 0.08
    assert torch.equal(exported[0, -1].argmax(), runtime[0, -1].argmax())
    assert (exported[0].argmax(-1) == runtime[0].argmax(-1)).float().mean() >= 0.9
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
