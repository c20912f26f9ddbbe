"""Every causal-LM family a user would QLoRA-tune: a tiny random model saved by transformers'
own `save_pretrained` (so in the checkpoint layout transformers writes: Mixtral's per-expert
`block_sparse_moe.experts.N.w1/w2/w3`, Qwen-MoE's `mlp.experts.N.gate_proj`, GPT-NeoX's
`embed_out` ...) loads in qforge through transformers' conversion mapping.

Oracle: transformers' own model from the same folder, float32, whose Linear weights (the ones qforge
quantises: all but lm_head and MoE routers) went through bitsandbytes' NF4 + double-quant
quantise/dequantise, and whose fused expert parameters went through it expert by expert (qforge
holds them in 4 bits, qforge.nn.experts). Both sides
dequantise to the same float32 values and run the same float32 ops: tolerance 1e-5 (observed: equal).

`qforge quantize` of each dense family writes a bitsandbytes folder that transformers + bitsandbytes
load (Linear layers as bnb Linear4bit) with the same logits as qforge's load of it; an MoE family's
folder holds its experts in 4 bits (one bitsandbytes weight per expert), which transformers'
bitsandbytes integration has no layer for, so it is checked by qforge's own round trip. qforge
loads what transformers + bitsandbytes save (their experts dense, quantised here on load).

Sizes are multiples of 64 wherever a Linear's input is: bitsandbytes 0.50's CPU Linear4bit crashes
in eval mode otherwise, and its CPU dequantize_4bit returns wrong values for a 2-D weight whose
last dimension is even but not a multiple of 64 (e.g. [64, 32]; the flattened weight is right).
"""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qforge.cli import main
from qforge.model.load import Checkpoint, load_model
from qforge.model.surgery import quantized_layers

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from tests.fixtures import FAMILIES, MOE_FAMILIES, tiny_family  # noqa: E402
from tests.fixtures import FAMILY_CONFIG as COMMON  # noqa: E402
from tests.fixtures import FAMILY_VOCAB as VOCAB  # noqa: E402

ROUTER_LINEARS = {"qwen2_moe": "shared_expert_gate", "phimoe": "router"}  # nn.Linear gates kept dense


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family -> folder of its tiny random model, written by save_pretrained on first use."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str):
        if family not in made:
            tiny_family(family).save_pretrained(str(root / family))
            made[family] = root / family
        return made[family]
    return get


def token_ids():
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(token_ids()).logits


def bnb_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 + double-quant quantise then dequantise (of the flattened weight: see above)."""
    packed, state = bnbf.quantize_4bit(weight.reshape(-1), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).view_as(weight)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_with_bitsandbytes_oracle_logits(family_dir, family):
    folder = family_dir(family)
    ours, _ = load_model(folder, compute_dtype=torch.float32)
    oracle = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    quantised = [name for name, _ in quantized_layers(ours)]
    plain = sorted(n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear))
    assert set(plain) == {"lm_head", ROUTER_LINEARS.get(family, "lm_head")}  # everything else is 4-bit
    for name in quantised:
        layer = oracle.get_submodule(name)
        layer.weight.data = bnb_roundtrip(layer.weight.data)
    if family in MOE_FAMILIES:  # the fused experts, merged from the checkpoint's per-expert tensors, in 4
        experts = {n: p for n, p in oracle.named_parameters() if p.dim() == 3}  # bits expert by expert
        assert experts and not [n for n, p in ours.named_parameters() if p.dim() == 3]
        for name, param in experts.items():
            module, _, leaf = name.rpartition(".")
            ours_w = ours.get_submodule(module).dequantized(leaf)
            param.data = torch.stack([bnb_roundtrip(w) for w in param.data])
            assert torch.equal(ours_w, param.data), name
    torch.testing.assert_close(logits(ours), logits(oracle), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_quantize_folder_loads_in_transformers_bitsandbytes(family_dir, family, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(family_dir(family)), str(out), "--compute-dtype", "float32"]) == 0
    capsys.readouterr()
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == sorted({"lm_head", ROUTER_LINEARS.get(family, "lm_head")})
    if family in MOE_FAMILIES:  # 4-bit fused experts: a layout bitsandbytes has no class for, so the
        keys = Checkpoint(out).keys()  # check is qforge's own round trip (the folder holds 4-bit experts)
        assert any(k.endswith("experts.down_proj.0.absmax") for k in keys)
        assert not any(k.endswith("experts.down_proj") for k in keys)
        direct, _ = load_model(family_dir(family), compute_dtype=torch.float32)
        again, _ = load_model(out, compute_dtype=torch.float32)
        assert torch.equal(logits(again), logits(direct))
        return
    theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    for module in theirs.modules():  # bitsandbytes' layers in train mode (DESIGN.md); the model in eval
        if isinstance(module, bnb.nn.Linear4bit):  # mode (Phi-MoE's router samples when training)
            module.train()
    ours, _ = load_model(out, compute_dtype=torch.float32)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules()) == len(list(quantized_layers(ours)))
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_neox"])
def test_qforge_loads_transformers_bitsandbytes_save_pretrained(family_dir, family, tmp_path):
    """transformers + bitsandbytes write the checkpoint layout back (per-expert tensors, dense;
    `embed_out`) beside bnb's 4-bit keys; qforge reads the 4-bit layers as stored and converts the rest."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(family_dir(family)), quantization_config=config,
                                                  device_map="cpu", dtype=torch.float32)
    theirs.save_pretrained(str(tmp_path / "bnb"))  # before any forward: eval forwards repack the weight
    ours, _ = load_model(tmp_path / "bnb", compute_dtype=torch.float32)
    theirs.eval()
    for param in theirs.parameters():  # their dense experts, which qforge quantises on load
        if param.dim() == 3:
            param.data = torch.stack([bnb_roundtrip(w) for w in param.data])
    for module in theirs.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules()) == len(list(quantized_layers(ours)))
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_expert_merge_reads_one_layer_group_at_a_time(family_dir, monkeypatch):
    """Building one fused expert tensor reads exactly that layer's per-expert tensors, no others."""
    from qforge.model.conversion import convert_checkpoint
    from qforge.model.load import build_skeleton, read_config

    folder = family_dir("mixtral")
    raw = Checkpoint(folder)
    ckpt = convert_checkpoint(raw, build_skeleton(read_config(folder), torch.float32))
    reads = []
    monkeypatch.setattr(raw, "read", lambda key, read=raw.read: reads.append(key) or read(key))
    fused = ckpt.read("model.layers.1.mlp.experts.gate_up_proj")
    assert sorted(reads) == sorted(f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"
                                   for e in range(4) for w in ("w1", "w3"))
    assert fused.shape == (4, 2 * 128, 64)  # [E, 2I, H]: w1 (gate) then w3 (up) of each expert
    w1, w3 = raw.read("model.layers.1.block_sparse_moe.experts.2.w1.weight"), \
        raw.read("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    assert torch.equal(fused[2], torch.cat([w1, w3]))
    assert "model.layers.0.mlp.gate.weight" in ckpt and "lm_head.weight" in ckpt


def test_sharded_moe_checkpoint_loads_the_same(family_dir, tmp_path):
    """Experts of one layer spread over several shards are gathered through the index."""
    folder = family_dir("qwen2_moe")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).save_pretrained(
        str(sharded), max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    whole, _ = load_model(folder, compute_dtype=torch.float32)
    parts, _ = load_model(sharded, compute_dtype=torch.float32)
    torch.testing.assert_close(logits(parts), logits(whole), rtol=0, atol=0)


def test_renamed_4bit_layer_keeps_its_quant_state(family_dir, tmp_path):
    """A 4-bit layer under a checkpoint name (GPT-NeoX's head as `embed_out`, quantised too): its
    bitsandbytes keys (`weight.absmax`, `weight.quant_state.*` ...) follow the weight's rename."""
    from safetensors.torch import load_file, save_file

    model, _ = load_model(family_dir("gpt_neox"), compute_dtype=torch.float32, skip_modules=())
    from qforge.model.checkpoint import save_quantized
    save_quantized(model, None, tmp_path / "q4")
    tensors = load_file(str(tmp_path / "q4" / "model.safetensors"))
    assert "lm_head.weight.absmax" in tensors
    save_file({k.replace("lm_head.", "embed_out.", 1) if k.startswith("lm_head.") else k: v
               for k, v in tensors.items()}, str(tmp_path / "q4" / "model.safetensors"))
    again, _ = load_model(tmp_path / "q4", compute_dtype=torch.float32)
    assert "lm_head" in dict(quantized_layers(again))
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_a_split_converter_runs_once_for_all_its_outputs(tmp_path, monkeypatch):
    """A one-to-many converter (a fused qkv checkpoint tensor split into q, k, v, as transformers'
    mapping does for some models) reads its source once; the other outputs wait until asked for."""
    from safetensors.torch import load_file, save_file
    from transformers.core_model_loading import Chunk, WeightConverter

    import qforge.model.conversion as conversion

    config = AutoConfig.for_model("llama", **dict(COMMON, num_key_value_heads=4))  # q, k, v all [64, 64]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "plain"))
    tensors = load_file(str(tmp_path / "plain" / "model.safetensors"))
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn."
        tensors[prefix + "qkv.weight"] = torch.cat([tensors.pop(prefix + f"{x}_proj.weight") for x in "qkv"])
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    save_file(tensors, str(tmp_path / "fused" / "model.safetensors"))
    split = WeightConverter("self_attn.qkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                     "self_attn.v_proj.weight"], operations=[Chunk(dim=0)])
    monkeypatch.setattr(conversion, "_transforms", lambda model: ([], [split]))
    reads = []
    real_read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, key: reads.append(key) or real_read(self, key))
    fused, _ = load_model(tmp_path / "fused", compute_dtype=torch.float32)
    assert reads.count("model.layers.1.self_attn.qkv.weight") == 1
    monkeypatch.undo()
    plain, _ = load_model(tmp_path / "plain", compute_dtype=torch.float32)
    torch.testing.assert_close(logits(fused), logits(plain), rtol=0, atol=0)


def test_missing_expert_is_a_clear_error(family_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    src = family_dir("qwen3_moe")
    (folder / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_model(folder, compute_dtype=torch.float32)
