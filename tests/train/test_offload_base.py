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

from tests.model.conftest import tiny_dir  # noqa: F401 (a fixture)

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


def test_a_run_prepared_with_offload_base_equals_the_run_without(tmp_path, tiny_dir):  # noqa: F811
    """Through the training-run API (load on the host, offload, then the rest to the device): the same
    losses bit for bit, the codes in host memory, the set-up line saying so, nothing left resident."""
    from qforge.train.run import prepare

    from .test_preference_run import settings
    plain = prepare(settings(tmp_path, tiny_dir, "plain", keep_base_outputs=None), log=lambda *_: None).train()
    lines = []
    run = prepare(settings(tmp_path, tiny_dir, "offload", keep_base_outputs=None, offload_base=True), log=lines.append)
    result = run.train()
    assert result.losses == plain.losses
    offload = run.model.base_offload
    assert offload.misses == 0 and offload.max_resident == 2 and not offload.resident
    assert any(str(line).startswith("--offload-base: 4-bit base of") for line in lines)
    assert all(b.state.packed.device.type == "cpu" for b in offloaded_bases(run.model))


@pytest.mark.slow
def test_the_embedded_model_holds_two_of_its_30_blocks_at_once(tmp_path):
    """SmolLM2-135M, one step of the demo recipe (short rows): the same loss as without offload, and the
    device copies resident at once are two blocks' bytes: 2/30 of the whole 4-bit base."""
    from qforge.model.surgery import quantized_layers
    from qforge.train.run import prepare

    def run_with(name, offload):
        cfg = TrainConfig.from_yaml("configs/demo.yaml", {
            "max_steps": 1, "batch_size": 2, "max_seq_len": 64, "eval_data": None, "eval_every": 0, "save_every": 0,
            "dropout": 0.0, "device": "cpu", "output_dir": str(tmp_path / name), "offload_base": offload})
        run = prepare(cfg, log=lambda *_: None)
        return run, run.train()

    _, plain = run_with("plain", False)
    run, result = run_with("offload", True)
    assert result.losses == plain.losses
    offload = run.model.base_offload
    whole = sum(layer.base.quant_state.nbytes() for _, layer in quantized_layers(run.model))
    assert len(offload.blocks) == 30 and offload.host_bytes == whole
    assert offload.max_resident == 2 and offload.peak_bytes == 2 * offload.block_bytes[0] == 2 * whole // 30
    assert offload.misses == 0 and not offload.resident


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device copies and the side stream need a GPU")
def test_on_cuda_the_codes_stay_pinned_on_the_host_and_the_losses_match(tmp_path, monkeypatch):
    """On a GPU: the codes pinned in host memory, two blocks at most on the GPU, the same losses as
    the run without offload (the fused LoRA kernel off in both: an offloaded base does not use it)."""
    monkeypatch.setenv("QFORGE_FUSED_LORA", "0")
    data, cuda = copy_task(), torch.device("cuda")
    plain = train_loop(tiny_model().to(cuda), TOKENIZER, data, None, config(tmp_path / "a"), log=lambda *_: None,
                       device=cuda)
    model = tiny_model()
    offload = offload_base(model, cuda)
    model.to(cuda)
    bases = offloaded_bases(model)
    assert all(b.state.packed.is_pinned() and b.host.weight is b.state.packed and b.device == cuda for b in bases)
    result = train_loop(model, TOKENIZER, data, None, config(tmp_path / "b"), log=lambda *_: None, device=cuda)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    assert offload.max_resident == 2 and offload.misses == 0 and not offload.resident


def test_dpo_with_offload_base_equals_dpo_without(tmp_path, tiny_dir):  # noqa: F811
    """DPO's reference forward (adapters off, no gradients) between the policy's forward and backward:
    the same losses and metrics, every product on a resident copy, nothing left after the run."""
    from qforge.train.run import prepare

    from .test_preference_run import settings
    plain = prepare(settings(tmp_path, tiny_dir, "a", objective="dpo", max_steps=2), log=lambda *_: None).train()
    run = prepare(settings(tmp_path, tiny_dir, "b", objective="dpo", max_steps=2, offload_base=True),
                  log=lambda *_: None)
    result = run.train()
    assert result.losses == plain.losses and result.metrics == plain.metrics
    offload = run.model.base_offload
    assert offload.misses == 0 and offload.max_resident == 2 and not offload.resident


def test_hqq_bases_are_refused_and_the_model_left_as_it_was():
    """(MoE expert banks are offloaded with their blocks: tests/train/test_offload_moe.py.)"""
    hqq = quantize_all(tiny_llama(vocab=64, layers=2), quant_type="hqq4")
    with pytest.raises(ValueError, match=r"^offload_base: the HQQ base is not offloaded"):
        offload_base(hqq, torch.device("cpu"))
    assert not offloaded_bases(hqq)


def test_moving_the_model_keeps_the_codes_on_the_host():
    """module.to() / float() after offloading: the layer's `weight` stays the host codes and the base
    still computes on the device it was given."""
    model = tiny_model()
    offload_base(model, torch.device("cpu"))
    model.to("cpu").float()
    model.to(torch.float32)
    bases = offloaded_bases(model)
    assert bases and all(b.host.weight is b.state.packed and b.device == torch.device("cpu") for b in bases)
