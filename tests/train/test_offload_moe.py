"""--offload-base on MoE models: each block's 4-bit expert banks wait in host memory with its linear
bases and come to the device with them (one schedule, the same counters). On the CPU the device
copies are fresh host tensors, so these tests run the whole mechanism on tiny random Mixtral and
Qwen2-MoE models (4 blocks, 4 experts): the losses and adapters (expert adapters included) equal a
run without it bit for bit, at most two blocks' copies exist at once, every product (expert products
included) found its block's copy, and none is left after a step."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from qforge.model import surgery
from qforge.nn import LoraSpec
from qforge.nn.experts import ExpertBank
from qforge.nn.offloaded_base import OffloadedQuant4bitBase
from qforge.nn.offloaded_experts import OffloadedExpertBank
from qforge.train.config import TrainConfig
from qforge.train.loop import train_loop
from qforge.train.offload_base import BaseOffload, offload_base
from tests.fixtures import quantize_all, randomise_adapters, tiny_mixtral_folder

from .test_loop import TOKENIZER, copy_task

LAYERS = 4
LINEARS = {"mixtral": 4, "qwen2_moe": 4 + 4}  # q k v o (+ the shared expert's gate up down and its 1-wide gate)


def moe(arch: str, dtype=torch.float32, checkpointing=True, keep=False, adapters=True):
    """A 4-block float32 Mixtral or Qwen2-MoE (hidden 64, 4 experts of width 32, top-2), every linear
    but lm_head and every expert bank in 4 bits computing in `dtype`, LoRA on all of them (random B,
    so that the first step's gradients reach every factor), prepared for training."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2, initializer_range=0.1,
                  tie_word_embeddings=False)
    cfg = MixtralConfig(intermediate_size=32, num_local_experts=4, **common) if arch == "mixtral" else \
        Qwen2MoeConfig(moe_intermediate_size=32, intermediate_size=64, num_experts=4,
                       shared_expert_intermediate_size=32, **common)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    quantize_all(model, compute_dtype=dtype)
    surgery.quantize_experts(model, compute_dtype=dtype)
    if adapters:
        surgery.add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32))
        randomise_adapters(model, seed=1, std=0.05)
    return surgery.prepare_for_kbit_training(model, checkpointing, keep_base_outputs=keep)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), lr=1e-2, batch_size=4, max_steps=3, compute_dtype="float32",
                warmup_ratio=0.0, seed=3, optimizer="paged_adamw_8bit", save_every=0, grad_accum=2)
    return TrainConfig(**{**base, **kw})


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def banks(model):
    return [b for _, m in surgery.expert_layers(model) for b in m.banks.values()]


def nothing_resident(model, offload):
    linear = [m.base for m in model.modules() if isinstance(getattr(m, "base", None), OffloadedQuant4bitBase)]
    return not offload.resident and all(b.resident is None for b in linear + banks(model))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("checkpointing, keep", [(True, False), (True, True), (False, False)],
                         ids=["recompute", "keep-base-outputs", "no-checkpointing"])
def test_losses_and_adapters_equal_the_run_without_bit_for_bit(tmp_path, arch, dtype, checkpointing, keep):
    data, name = copy_task(), str(dtype).split(".")[-1]
    plain_model = moe(arch, dtype, checkpointing, keep)
    plain = train_loop(plain_model, TOKENIZER, data, None, config(tmp_path / "a", compute_dtype=name),
                       log=lambda *_: None)
    model = moe(arch, dtype, checkpointing, keep)
    offload = offload_base(model, torch.device("cpu"))
    # per block: its 4-bit linear bases, then its two expert banks (gate_up_proj, down_proj)
    assert len(offload.blocks) == LAYERS
    assert all(len(b) == LINEARS[arch] + 2 and all(isinstance(x, OffloadedExpertBank) for x in b[-2:])
               for b in offload.bases)
    assert len(banks(model)) == 2 * LAYERS and all(isinstance(b, OffloadedExpertBank) for b in banks(model))
    result = train_loop(model, TOKENIZER, data, None, config(tmp_path / "b", compute_dtype=name), log=lambda *_: None)
    assert result.losses == plain.losses
    a, b = trainable(plain_model), trainable(model)
    assert any(".experts." in k for k in a)  # the expert adapters are compared too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert offload.max_resident == 2
    assert offload.misses == 0  # every product, the experts' too, found its block's copy
    assert offload.brought == 3 * 2 * 2 * LAYERS  # steps x micro-batches x (forward + backward) x blocks
    assert nothing_resident(model, offload)
    # the banks' bytes are counted with their block: the two largest blocks at the peak, experts included
    expert = [sum(x.nbytes() for x in b[-2:]) for b in offload.bases]
    assert all(e > 0 for e in expert) and offload.peak_bytes == sum(sorted(offload.block_bytes)[-2:])
    assert offload.host_bytes == sum(layer.base.nbytes() for _, layer in surgery.quantized_layers(model)) + sum(
        bank.nbytes() for bank in banks(model))


def test_expert_products_compute_from_fresh_copies_and_the_host_tensors_stay():
    """While a block's experts compute, their bank's resident copy is other storage holding the same
    bytes as the host tensors, which stay the registered buffers; the current block and the next one
    are resident then; after the forward and the backward nothing is."""
    model = moe("mixtral")
    registered = {k: v for k, v in model.named_buffers() if ".experts." in k}
    offload = offload_base(model, torch.device("cpu"))
    seen = []

    def check(experts, args):
        for name, bank in experts.banks.items():
            assert bank.resident is not None
            for suffix, host in bank.tensors().items():
                copy_ = bank.resident.tensors()[suffix]
                assert copy_.data_ptr() != host.data_ptr() and torch.equal(copy_, host)
                assert experts._buffers[name + suffix] is host
        seen.append(sorted(offload.resident))

    for _, experts in surgery.expert_layers(model):
        experts.register_forward_pre_hook(check)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    assert seen == [[0, 1], [1, 2], [2, 3], [3]]
    assert not offload.resident
    loss.backward()
    assert nothing_resident(model, offload) and offload.misses == 0
    after = dict(model.named_buffers())
    assert all(torch.equal(after[k], v) and after[k].device.type == "cpu" for k, v in registered.items())


def test_the_state_dict_is_unchanged_and_loads_back_into_the_host_tensors():
    model = moe("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    offload_base(model, torch.device("cpu"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    other = moe("qwen2_moe")
    offload_base(other, torch.device("cpu"))
    bank = banks(other)[0]
    host = bank.packed
    with torch.no_grad():
        host.zero_()
    other.load_state_dict(before)
    assert banks(other)[0].packed is host and torch.equal(host, before[[k for k in before if k.endswith(
        "experts.gate_up_proj")][0]])


def test_an_expert_product_outside_the_hooks_copies_its_expert_and_counts_it():
    """With the hooks taken off, every expert product makes its own temporary copy: the same logits,
    each counted in misses (one per routed expert and bank)."""
    model = moe("mixtral", adapters=False).eval()
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    offload = offload_base(model, torch.device("cpu"))
    offload.remove()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    bank_misses = sum(b.misses for b in banks(model))
    assert offload.misses == 4 * LAYERS + bank_misses and bank_misses >= 2 * 2 * LAYERS  # >= 2 experts routed


def test_merged_weights_and_the_dense_copy_are_the_host_banks():
    model = moe("mixtral")
    plain = copy.deepcopy(model)
    offload_base(model, torch.device("cpu"))
    (_, ours), (_, theirs) = next(surgery.expert_layers(model)), next(surgery.expert_layers(plain))
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(ours.merged_weight(name, "default"), theirs.merged_weight(name, "default"))


def test_moving_the_model_keeps_the_banks_on_the_host():
    model = moe("mixtral")
    offload_base(model, torch.device("cpu"))
    before = [dict(b.tensors()) for b in banks(model)]
    model.to("cpu").float()
    model.to(torch.bfloat16)
    for bank, tensors in zip(banks(model), before):
        assert bank.device == torch.device("cpu") and bank.resident is None
        assert all(bank.tensors()[k] is t and t.dtype in (torch.uint8, torch.float32) for k, t in tensors.items())


def test_offloaded_or_sharded_banks_are_refused_before_anything_changes():
    from qforge.nn.sharded_experts import shard_banks
    model = moe("mixtral")
    offload_base(model, torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded already"):
        BaseOffload(model, torch.device("cpu"))
    sharded = moe("mixtral")
    for _, experts in surgery.expert_layers(sharded):
        shard_banks(experts, torch.float32)
    with pytest.raises(ValueError, match=r"^offload_base: the 4-bit expert banks are sharded across processes"):
        offload_base(sharded, torch.device("cpu"))
    assert not any(isinstance(getattr(m, "base", None), OffloadedQuant4bitBase) for m in sharded.modules())


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return tiny_mixtral_folder(tmp_path_factory.mktemp("mixtral"), layers=3)


def test_a_mixtral_folder_trained_with_offload_base_equals_the_run_without(tmp_path, mixtral_dir):
    """Through the training-run API (a Mixtral folder loaded on the host, offloaded, the rest moved):
    the same losses and saved adapter bit for bit; the banks offloaded, nothing left resident."""
    from safetensors.torch import load_file

    from qforge.train.run import prepare
    rows = [{"conversations": [{"from": "human", "value": f"w{i} w{i + 1} w{i + 2}"},
                               {"from": "gpt", "value": f"w{i + 3} w9 w9"}]} for i in range(16)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run_with(name, offload):
        cfg = TrainConfig(model=str(mixtral_dir), data=str(data), rank=4, alpha=8, dropout=0.0, batch_size=4,
                          max_seq_len=64, max_steps=3, compute_dtype="float32", output_dir=str(tmp_path / name),
                          warmup_steps=0, lr=5e-3, offload_base=offload)
        run = prepare(cfg, log=lines.append)
        result = run.train()
        run.save()
        return run, result

    lines = []
    _, plain = run_with("plain", False)
    run, result = run_with("offload", True)
    assert result.losses == plain.losses
    assert any(str(line).startswith("--offload-base: 4-bit base of") and "(6 MoE expert banks included) in 3 blocks"
               in str(line) for line in lines)
    offload = run.model.base_offload
    assert len(offload.blocks) == 3 and sum(isinstance(b, OffloadedExpertBank) for b in banks(run.model)) == 6
    assert offload.misses == 0 and offload.max_resident == 2 and nothing_resident(run.model, offload)
    a, b = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("plain", "offload"))
    assert a.keys() == b.keys() and any("experts" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device copies and the side stream need a GPU")
def test_on_cuda_the_banks_stay_pinned_on_the_host_and_the_losses_match(tmp_path, monkeypatch):
    """On a GPU: the banks' tensors pinned in host memory, two blocks at most on the GPU, the same
    losses as the run without offload (the fused LoRA kernel off in both)."""
    monkeypatch.setenv("QFORGE_FUSED_LORA", "0")
    data, cuda = copy_task(), torch.device("cuda")
    plain = train_loop(moe("mixtral").to(cuda), TOKENIZER, data, None, config(tmp_path / "a"), log=lambda *_: None,
                       device=cuda)
    model = moe("mixtral")
    offload = offload_base(model, cuda)
    model.to(cuda)
    for bank in banks(model):
        assert bank.device == cuda and all(t.is_pinned() for t in bank.tensors().values())
    result = train_loop(model, TOKENIZER, data, None, config(tmp_path / "b"), log=lambda *_: None, device=cuda)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    assert offload.max_resident == 2 and offload.misses == 0 and nothing_resident(model, offload)
    assert all(isinstance(b, ExpertBank) for b in banks(model))
