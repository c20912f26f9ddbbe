"""The planner on mixture-of-experts models and on the three other places a model's shape comes
from: a GGUF file's metadata, a Hub id in the local Hugging Face cache (offline), a folder.

Parameter counts are checked exactly against transformers' own models (built on the meta device:
shapes only); published totals against the model cards.
"""
import json

import pytest

from qforge import cli
from qforge.plan import (GB, ModelArch, active_parameter_count, adapter_tensors, as_arch, expert_bytes, expert_parameter_count,
                         keep_base_outputs_for, load_arch, parameter_count, plan_for_config, plan_run,
                         warn_if_unfit)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
MOE = dict(num_experts_per_tok=2)
CONFIGS = {  # name -> (model_type, config beyond TINY)
    "mixtral": ("mixtral", {"num_local_experts": 4, **MOE}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                                "decoder_sparse_step": 2, "mlp_only_layers": [1], **MOE}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 8, "moe_intermediate_size": 32, "head_dim": 32, **MOE}),
    "olmoe": ("olmoe", {"num_experts": 4, **MOE}),
    "deepseek_v3": ("deepseek_v3", {"n_routed_experts": 4, "moe_intermediate_size": 32, "n_shared_experts": 2,
                                    "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 48,
                                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 24, "n_group": 1,
                                    "topk_group": 1, **MOE}),
    "deepseek_v3_no_q_lora": ("deepseek_v3", {"n_routed_experts": 4, "moe_intermediate_size": 32, "n_shared_experts": 1,
                                              "first_k_dense_replace": 2, "kv_lora_rank": 32, "q_lora_rank": None,
                                              "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                                              "n_group": 1, "topk_group": 1, **MOE}),
    "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {"head_dim": 32}), "gemma2": ("gemma2", {"head_dim": 16}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16}), "olmo2": ("olmo2", {}), "mistral": ("mistral", {}),
}


def meta_model(config):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_match_transformers(name):
    from transformers import AutoConfig

    model_type, extra = CONFIGS[name]
    config = AutoConfig.for_model(model_type, **TINY, **extra)
    model = meta_model(config)
    arch = ModelArch.from_config(config.to_dict())
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3)  # the fused expert tensors
    assert expert_parameter_count(arch) == experts
    if experts:  # a token runs through k of the E experts of every MoE layer
        idle = experts * (arch.num_experts - arch.experts_per_token) // arch.num_experts
        assert active_parameter_count(arch) == parameter_count(arch) - idle
    else:
        assert active_parameter_count(arch) == parameter_count(arch)


def test_shipped_qwen3_moe_matches_transformers_and_its_model_card():
    from transformers import AutoConfig

    arch = as_arch("qwen3-30b-a3b")
    model = meta_model(AutoConfig.for_model(**load_arch("qwen3-30b-a3b")))
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    assert 30.4e9 < parameter_count(arch) < 30.6e9 and 3.3e9 < active_parameter_count(arch) < 3.4e9  # "30B-A3B"


def test_mixtral_8x22b_in_nf4_is_the_seeds_70_gb():
    arch = as_arch("mixtral-8x22b")
    assert 140.5e9 < parameter_count(arch) < 141e9 and 39e9 < active_parameter_count(arch) < 39.3e9
    plan = plan_run(arch, "qlora")
    # 141B weights at 4 bits: 70.3 GB; the BF16 embeddings and LM head add 0.8 GB, the constants 2.2 GB
    assert 68 * GB < plan.base_weights < 72 * GB
    assert 0.126 < plan.quant_constants * 8 / (parameter_count(arch) - 2 * 32000 * 6144) < 0.128
    # the routed experts are 96% of the model: 4 bits + constants, 135.3B x 4.127 bits
    assert expert_bytes(arch) == pytest.approx(135.29e9 * 4.127 / 8, rel=0.002)
    assert expert_bytes(arch, double_quant=False) > expert_bytes(arch)


def test_cli_prints_moe_sizes(capsys):
    assert cli.main(["plan", "--model", "Mixtral-8x22B", "--gpu", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "140.62 B parameters" in out and "8 experts (2 per token)" in out
    assert "39.15 B active per token; routed experts 135.29 B (96%)" in out
    assert "experts in NF4 with double quantisation: 69.79 GB" in out


# ---- a GGUF file ---------------------------------------------------------------------------------
def write_gguf(path, arch="qwen3moe", tied=True, experts=8):
    """A tiny GGUF file written with llama.cpp's own `gguf` package: metadata and two small tensors."""
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-moe")
    writer.add_block_count(4)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(32)
    writer.add_token_list([f"t{i}" for i in range(128)])
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(32)
    writer.add_tensor("token_embd.weight", np.zeros((128, 64), dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((128, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_metadata_gives_the_same_arch_as_the_config(tmp_path):
    from transformers import AutoConfig

    path = write_gguf(tmp_path / "tiny.gguf")
    config = AutoConfig.for_model("qwen3_moe", **TINY, num_experts=8, moe_intermediate_size=32, head_dim=32,
                                  tie_word_embeddings=True, **MOE)
    from_gguf = ModelArch.from_config(load_arch(path), name="x")
    assert from_gguf == ModelArch.from_config(config.to_dict(), name="x")
    assert parameter_count(from_gguf) == sum(p.numel() for p in meta_model(config).parameters())
    untied = ModelArch.from_config(load_arch(write_gguf(tmp_path / "untied.gguf", tied=False)))
    assert parameter_count(untied) == parameter_count(from_gguf) + 128 * 64


@pytest.mark.slow  # the reader parses SmolLM2's 49k tokens and merges: 2-10 s
def test_gguf_of_the_embedded_model_matches_its_config():
    from qforge.model.embedded import smollm2_gguf_path

    arch = ModelArch.from_config(load_arch(smollm2_gguf_path()))  # the package is a project dependency
    assert parameter_count(arch) == parameter_count(as_arch("smollm2")) == 134_515_008
    assert (arch.num_layers, arch.hidden_size, arch.num_kv_heads, arch.tie_word_embeddings) == (30, 576, 3, True)


def test_plan_and_train_policy_read_a_gguf(tmp_path, capsys):
    """`qforge plan --model x.gguf` and the run-time policy (what printed "'utf-8' codec can't decode")."""
    from types import SimpleNamespace

    path = write_gguf(tmp_path / "tiny.gguf")
    assert cli.main(["plan", "--model", str(path)]) == 0
    assert "4 layers, hidden 64, vocab 128, 8 experts (2 per token)" in capsys.readouterr().out
    cfg = SimpleNamespace(method="qlora", batch_size=1, max_seq_len=64, rank=8, gradient_checkpointing=True,
                          quant_type="nf4", double_quant=True, optimizer="paged_adamw_8bit", model=str(path),
                          keep_base_outputs=None, grad_accum=1)
    assert plan_for_config(cfg).total > 0
    lines = []
    assert not warn_if_unfit(cfg, log=lines.append, device="cpu", available_bytes=10**6)
    assert len(lines) == 1 and lines[0].startswith("warning: this run may not fit")
    keep, why = keep_base_outputs_for(cfg, device="cpu", available_bytes=10**12)
    assert keep and "keeps the base products" in why


def test_bad_gguf_files(tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00\xec\xff" + b"\x00" * 20)
    with pytest.raises(ValueError, match="fake.gguf"):
        load_arch(fake)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_arch(tmp_path / "missing.gguf")
    dense = write_gguf(tmp_path / "no-ffn.gguf", experts=0)
    assert ModelArch.from_config(load_arch(dense)).num_experts == 0
    assert cli.main(["plan", "--model", str(fake)]) == 2
    assert "fake.gguf" in capsys.readouterr().err


# ---- a Hub id, from the local cache --------------------------------------------------------------
def fake_hub_cache(root, repo_id, config):
    """The Hub cache layout huggingface_hub writes: refs/main names a commit, snapshots/<commit>/ its files."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snapshot = folder / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def test_hub_id_reads_the_cached_config_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "someorg/Tiny-MoE", load_arch("mixtral-8x22b"))
    assert load_arch("someorg/Tiny-MoE") == load_arch("mixtral-8x22b")
    assert cli.main(["plan", "--model", "someorg/Tiny-MoE", "--method", "qlora"]) == 0
    assert "39.15 B active per token" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not-cached/model.*Hugging Face cache"):
        load_arch("not-cached/model")
    assert cli.main(["plan", "--model", "not-cached/model"]) == 2
    assert "Hugging Face cache" in capsys.readouterr().err


def test_expert_adapter_count_matches_peft_target_parameters():
    """LoRA on fused experts the way PEFT 0.21 puts it there: per expert, A [r, in] and B [out, r]."""
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig

    config = AutoConfig.for_model("mixtral", **TINY, num_local_experts=4, **MOE)
    model = peft.get_peft_model(meta_model(config), peft.LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(n * k for n, k in adapter_tensors(ModelArch.from_config(config.to_dict()), 8)) == trained
