"""--offload-base: the 4-bit base waits in host memory and each block's codes come to the device for its
forward and backward. On the CPU the device copies are fresh host tensors, so these tests run the
whole mechanism: the losses and adapters equal a run without it bit for bit (float32 and bf16, with
full, selective and no gradient checkpointing), at most two blocks' copies exist at once, every
product found its block's copy (no temporary copy), and none is left after a step."""
import pytest
import torch

from qforge.model import surgery
from qforge.nn import LoraSpec, Quant4bitBase
from qforge.nn.offloaded_base import OffloadedQuant4bitBase
from qforge.train.config import TrainConfig
from qforge.train.loop import train_loop
from qforge.train.loss import causal_lm_loss
from qforge.train.offload_base import BaseOffload, check_offload, offload_base
from tests.fixtures import quantize_all, tiny_llama

from .test_loop import TOKENIZER, copy_task

LAYERS = 4


def tiny_model(dtype=torch.float32, checkpointing=True, keep=False):
    model = quantize_all(tiny_llama(vocab=64, layers=LAYERS, max_position_embeddings=64), compute_dtype=dtype)
    surgery.add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.1, dtype=torch.float32))
    return surgery.prepare_for_kbit_training(model, checkpointing, keep_base_outputs=keep)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), lr=1e-2, batch_size=4, max_steps=3, compute_dtype="float32",
                warmup_ratio=0.0, seed=3, optimizer="paged_adamw_8bit", save_every=0, grad_accum=2)
    return TrainConfig(**{**base, **kw})


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def offloaded_bases(model):
    return [m.base for m in model.modules() if isinstance(getattr(m, "base", None), OffloadedQuant4bitBase)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("checkpointing, keep", [(True, False), (True, True), (False, False)],
                         ids=["recompute", "keep-base-outputs", "no-checkpointing"])
def test_losses_and_adapters_equal_the_run_without_bit_for_bit(tmp_path, dtype, checkpointing, keep):
    data, name = copy_task(), str(dtype).split(".")[-1]
    plain_model = tiny_model(dtype, checkpointing, keep)
    plain = train_loop(plain_model, TOKENIZER, data, None, config(tmp_path / "a", compute_dtype=name),
                       log=lambda *_: None)
    model = tiny_model(dtype, checkpointing, keep)
    offload = offload_base(model, torch.device("cpu"))
    assert len(offload.blocks) == LAYERS and all(len(b) == 7 for b in offload.bases)  # q k v o gate up down
    result = train_loop(model, TOKENIZER, data, None, config(tmp_path / "b", compute_dtype=name), log=lambda *_: None)
    assert result.losses == plain.losses
    a, b = adapters(plain_model), adapters(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the schedule: each block brought for forward and again for backward, two at most at once
    assert offload.max_resident == 2
    assert offload.misses == 0  # every product found its block's copy on the device
    assert offload.brought == 3 * 2 * 2 * LAYERS  # steps x micro-batches x (forward + backward) x blocks
    assert not offload.resident and all(base.resident is None for base in offloaded_bases(model))


def test_device_copies_are_fresh_tensors_and_the_host_codes_stay():
    """During a block's forward its layers compute from copies (other storage, the same bytes); the host
    codes are the layer's `weight` buffer throughout and nothing else of the block is resident then."""
    model = tiny_model()
    host = {id(m): m.base.quant_state.packed for m in model.modules() if isinstance(getattr(m, "base", None),
                                                                                   Quant4bitBase)}
    offload = offload_base(model, torch.device("cpu"))
    seen = []

    def check(layer, args):
        base = layer.base
        assert base.resident is not None
        assert base.resident.packed.data_ptr() != base.state.packed.data_ptr()
        assert torch.equal(base.resident.packed, base.state.packed)
        assert layer.weight is base.state.packed and torch.equal(layer.weight, host[id(layer)])
        seen.append(sorted(offload.resident))

    for m in model.modules():
        if isinstance(getattr(m, "base", None), OffloadedQuant4bitBase):
            m.register_forward_pre_hook(check)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    assert seen[0] == [0, 1] and seen[-1] == [LAYERS - 1]  # the current block and the next one, prefetched
    assert not offload.resident  # released after the forward
    loss.backward()
    assert not offload.resident and offload.misses == 0
    assert all(m.weight.device.type == "cpu" for m in model.modules() if hasattr(m, "base"))


def test_a_forward_without_gradients_brings_and_releases_each_block():
    model = tiny_model()
    offload = offload_base(model, torch.device("cpu"))
    model.eval()
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
    assert offload.brought == LAYERS and offload.max_resident == 2 and not offload.resident and offload.misses == 0


def test_a_product_outside_the_hooks_makes_a_temporary_copy_and_counts_it():
    """Removing the hooks leaves correct (slower) products: each counted in misses."""
    model = tiny_model()
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    offload = offload_base(model, torch.device("cpu"))
    offload.remove()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert offload.misses == 7 * LAYERS


def test_the_state_dict_is_the_host_codes_and_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    offload_base(model, torch.device("cpu"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("settings, expected", [
    (dict(method="lora"), "offload_base: keeps a 4-bit base in host memory; method lora has none"),
    (dict(method="full"), "offload_base: keeps a 4-bit base in host memory; method full has none"),
    (dict(quant_type="hqq4"), "offload_base: offloads an nf4 or fp4 base, not quant_type hqq4 (HQQ)"),
])
def test_settings_without_a_4bit_base_are_refused_in_one_line(settings, expected):
    with pytest.raises(ValueError) as exc:
        TrainConfig(offload_base=True, **settings)
    assert str(exc.value).startswith(expected) and "\n" not in str(exc.value)


def test_several_processes_are_refused_in_one_line():
    check_offload(TrainConfig(offload_base=True), 1)
    check_offload(TrainConfig(), 4)
    with pytest.raises(ValueError, match=r"^offload_base: --offload-base trains in one process; with 2 processes"):
        check_offload(TrainConfig(offload_base=True), 2)


def test_the_cli_refuses_nproc_with_offload_base_before_starting_processes(capsys):
    from qforge.cli import main
    code = main(["train", "--data", "unused.jsonl", "--offload-base", "--nproc", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "offload_base: --offload-base trains in one process" in err


def test_a_sharded_or_offloaded_base_is_refused():
    model = tiny_model()
    offload_base(model, torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded already"):
        BaseOffload(model, torch.device("cpu"))
