"""Streaming load against transformers: a tiny Llama loaded by qforge must give the logits of the
transformers model whose linear weights are replaced by dequantize(quantize(W)), exactly in float32
compute; with quantize=False, the logits of the plain transformers model."""
import math
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qforge.model.load import load_model
from qforge.model.surgery import add_adapter
from qforge.nn import AdaptedLinear, LoraSpec, Quant4bitBase
from qforge.quant import dequantize, quantize

from .conftest import write_tiny

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def dequantised_reference(folder, targets=None, **quant):
    """transformers' model, every target Linear's weight W replaced by dequant(quant(W)) in float32."""
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for name, module in ref.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf != "lm_head" and (targets is None or leaf in targets):
            module.weight.data = dequantize(quantize(module.weight.data, **quant), torch.float32)
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("variant", [dict(), dict(tied=False, bias=True), dict(rope=LLAMA3_ROPE)],
                         ids=["tied", "untied+bias", "llama3-rope"])
def test_streaming_load_equals_transformers_on_dequantised_weights(tmp_path, token_ids, layout, variant):
    folder = write_tiny(tmp_path, shard="60KB" if layout == "sharded" else None, **variant)
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*.safetensors"))) > 3
    model, tokenizer = load_model(folder, compute_dtype=torch.float32)
    assert tokenizer is None
    ref = dequantised_reference(folder)
    torch.testing.assert_close(logits(model, token_ids), logits(ref, token_ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert sum(isinstance(m, AdaptedLinear) for m in model.modules()) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == variant.get("tied", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_load_equals_transformers(tmp_path, token_ids, dtype):
    folder = write_tiny(tmp_path, shard="60KB", dtype=dtype)
    model, _ = load_model(folder, quantize=False, compute_dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert all(p.dtype == dtype for p in model.parameters())
    torch.testing.assert_close(logits(model, token_ids), logits(ref, token_ids), rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bf16_compute_dtypes_and_bf16_checkpoint(tmp_path, token_ids):
    folder = write_tiny(tmp_path, dtype=torch.bfloat16)
    model, _ = load_model(folder)  # compute dtype bfloat16 by default
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.base.quant_state.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = dequantised_reference(folder).to(torch.bfloat16)
    torch.testing.assert_close(logits(model, token_ids).float(), logits(ref, token_ids).float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("quant", [dict(quant_type="fp4", double_quant=False, blocksize=128),
                                   dict(quant_type="nf4", double_quant=True, blocksize=256)])
def test_quant_settings_and_target_subset(tmp_path, token_ids, quant):
    folder = write_tiny(tmp_path)
    model, _ = load_model(folder, compute_dtype=torch.float32, target_modules=["q_proj", "down_proj"], **quant)
    quantised = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert quantised == {"q_proj", "down_proj"}
    st = model.model.layers[1].mlp.down_proj.base.quant_state
    assert (st.quant_type, st.nested, st.blocksize) == (quant["quant_type"], quant["double_quant"], quant["blocksize"])
    ref = dequantised_reference(folder, targets={"q_proj", "down_proj"}, **quant)
    torch.testing.assert_close(logits(model, token_ids), logits(ref, token_ids), rtol=1e-5, atol=1e-5)


def test_lora_adapter_is_attached_and_starts_as_the_base(tiny_dir, token_ids):
    base, _ = load_model(tiny_dir, compute_dtype=torch.float32)
    model, tokenizer = load_model(tiny_dir, compute_dtype=torch.float32)
    assert not any(m.adapters for m in model.modules() if isinstance(m, AdaptedLinear))  # the loader adds none
    add_adapter(model, "mine", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert layers and all(m.active_adapter == "mine" and list(m.adapters) == ["mine"] for m in layers)
    torch.testing.assert_close(logits(model, token_ids), logits(base, token_ids))  # B starts at zero
    assert tokenizer is not None and tokenizer.chat_template


def test_gguf_source_loads_like_its_converted_folder(tmp_path, token_ids):
    """A GGUF file (written with gguf-py from the tiny model) through transformers' GGUF loader."""
    pytest.importorskip("gguf")
    from qforge.model.load import convert_gguf

    gguf_path = write_tiny_gguf(tmp_path)
    folder = convert_gguf(gguf_path, tmp_path / "converted")
    from_gguf, _ = load_model(gguf_path, compute_dtype=torch.float32)
    from_folder, _ = load_model(folder, compute_dtype=torch.float32)
    torch.testing.assert_close(logits(from_gguf, token_ids), logits(from_folder, token_ids), rtol=0, atol=0)


def write_tiny_gguf(tmp_path):
    """The tiny model as a float32 GGUF file (llama.cpp tensor names, Q/K permuted as llama.cpp
    expects, and a minimal tokenizer)."""
    import gguf
    import numpy as np

    from .conftest import VOCAB, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM
    sd = LlamaForCausalLM(cfg).state_dict()
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["t", "0", "t0"] + [f"x{i}" for i in range(VOCAB - 3)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["t 0"])

    def permute(t, heads):  # HF -> llama.cpp rotary layout (transformers un-permutes on load)
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"].numpy()
            if hf == "self_attn.q_proj":
                t = permute(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_loftq_load_initialises_base_and_adapter_from_the_dense_weight(tmp_path):
    """LoftQ loading (the training run's, qforge.adapters.loftq): base + s*B@A is closer to the
    dense weight than the plain NF4 base alone."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qforge.adapters.loftq import load_loftq_model
    from qforge.nn import LoraSpec

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    dense = LlamaForCausalLM(cfg)
    dense.save_pretrained(tmp_path)
    model, _ = load_loftq_model(str(tmp_path), LoraSpec(r=8, alpha=8, loftq_iters=2, dtype=torch.float32),
                                compute_dtype=torch.float32)
    w = dense.model.layers[0].mlp.up_proj.weight.float()
    layer = model.model.layers[0].mlp.up_proj
    a = layer.adapters["default"]
    plain = (w - layer.dequantized(torch.float32)).norm()
    with_adapter = (w - layer.dequantized(torch.float32) - a.delta_weight()).norm()
    assert with_adapter < 0.97 * plain


def _quant_states(model):
    return {n: m.base.quant_state for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def _same_state(a, b) -> bool:
    tensors = ("packed", "absmax", "code", "nested_absmax", "nested_code")
    return a.offset == b.offset and all(torch.equal(getattr(a, t).cpu(), getattr(b, t).cpu()) for t in tensors)


def test_load_streams_onto_the_device(tmp_path, token_ids, device, monkeypatch):
    """load_model(device=...): each weight is moved to the device before it is quantised, there,
    with the bits of a CPU load (on the CPU the device route of dispatch is taken in Triton's
    interpreter); everything ends on the device; a bitsandbytes folder goes there as stored. On
    CUDA the device never holds more than the 4-bit model plus about one layer in 16 bits."""
    from qforge.kernels import dispatch
    from qforge.model import load as load_mod
    from qforge.model.checkpoint import save_quantized

    folder = write_tiny(tmp_path / "dense", shard="60KB", dtype=torch.bfloat16, tied=False, bias=True)
    ref, _ = load_model(folder, compute_dtype=torch.float32)
    seen, real = [], load_mod.quantize_tensor
    monkeypatch.setattr(load_mod, "quantize_tensor", lambda w, **q: seen.append(w.device.type) or real(w, **q))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with monkeypatch.context() as m:
        if not on_cuda and os.environ.get("TRITON_INTERPRET") == "1":  # the CUDA route, interpreted
            m.setattr(dispatch, "_native_ok", lambda *t: False)
            m.setattr(dispatch, "use_triton", lambda *t: True)
        model, _ = load_model(folder, compute_dtype=torch.float32, device=device)
    if on_cuda:
        four_bit = sum(s.nbytes() for s in _quant_states(model).values())
        rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "adapters" not in n)
        layer = max(math.prod(s.shape) * 4 for s in _quant_states(model).values())
        assert torch.cuda.max_memory_allocated() - before <= four_bit + rest + 3 * layer
    assert seen == [torch.device(device).type] * 14
    assert all(t.device.type == torch.device(device).type for t in list(model.parameters()) + list(model.buffers()))
    states, ref_states = _quant_states(model), _quant_states(ref)
    assert states.keys() == ref_states.keys() and all(_same_state(states[k], ref_states[k]) for k in states)
    ids = token_ids.to(device)
    torch.testing.assert_close(logits(model, ids).cpu(), logits(ref, token_ids), rtol=1e-5, atol=1e-5)

    bnb_folder = save_quantized(ref, None, tmp_path / "bnb")
    seen.clear()
    stored, _ = load_model(bnb_folder, compute_dtype=torch.float32, device=device)
    add_adapter(stored, "default", LoraSpec(r=4))  # on the device of each layer
    assert seen == []  # read as stored, never requantised
    assert all(t.device.type == torch.device(device).type for t in list(stored.parameters()) + list(stored.buffers()))
    assert all(_same_state(s, ref_states[k]) for k, s in _quant_states(stored).items())
