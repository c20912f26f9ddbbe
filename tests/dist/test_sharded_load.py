"""Sharded loading (qforge.dist.load, qforge.train.sharded_load) in 2 gloo processes on the CPU.

Each rank loads a tiny random Llama block by block, keeping only its shard; against the path it
replaces (every rank loads the whole model, then shards it: load_for_method + shard_for_group) in
the same process, the model is the same: the same adapters' initial values, the same loss and
the same gradients, bit for bit (same bytes, same products). Against one process without
sharding the loss agrees to float32 rounding. What a rank holds while loading is bounded by the
sizes: its shard of the finished model plus the largest block (or the root's tensors) whole.
"""
import os
import socket

import pytest
import torch

from qforge.dist.load import held_tensor_bytes
from qforge.dist.shard import blocks

LAYERS = 6


def tiny_folder(folder, tied: bool):
    from tests.fixtures import tiny_llama, word_tokenizer, write_tiny_folder
    model = tiny_llama(hidden=128, layers=LAYERS, vocab=96, tied=tied, intermediate=256, max_position_embeddings=64)
    return write_tiny_folder(folder, model, word_tokenizer())


def prequantised_folder(folder, source):
    """`source` saved in bitsandbytes' 4-bit format (nf4, double quantisation)."""
    from qforge.model.checkpoint import save_quantized
    from qforge.model.load import load_model
    model, tok = load_model(str(source), compute_dtype=torch.float32)
    save_quantized(model, tok, folder)
    return folder


def config(folder, **kw):
    from qforge.train.config import TrainConfig
    return TrainConfig(model=str(folder), compute_dtype="float32", dropout=0.0, rank=4, alpha=8, seed=3,
                       gradient_checkpointing=False, **kw)


BATCH = torch.randint(5, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a sharded tensor, gathered (collective)


def loss_and_grads(model) -> tuple[float, dict]:
    """The loss of BATCH and every trainable parameter's value and gradient, whole."""
    model.train()
    loss = model(input_ids=BATCH, labels=BATCH, use_cache=False).loss
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return loss.item(), {n: (full(p.detach()).clone(), full(p.grad).clone()) for n, p in trainable}


def _rank(rank, world, port, folder, queue, kw):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from qforge.dist import init_group
    from qforge.train.run import count_parameters, load_for_method, shard_for_group
    from qforge.train.sharded_load import load_sharded_for_method

    group = init_group(timeout_s=60)
    cfg = config(folder, **kw)
    loaded = load_sharded_for_method(cfg, group, log=lambda *_: None)
    assert loaded is not None, "the tiny Llama loads sharded"
    model, _, counts, sharding = loaded
    got = loss_and_grads(model)
    ref_model, _ = load_for_method(cfg, group.device)
    ref_counts = count_parameters(ref_model)
    shard_for_group(ref_model, cfg, group, log=lambda *_: None)
    ref = loss_and_grads(ref_model)
    out = {"loss": got[0], "ref_loss": ref[0], "counts": counts, "ref_counts": ref_counts,
           "same": sorted(n for n in got[1] if all(torch.equal(a, b) for a, b in zip(got[1][n], ref[1].get(n, ())))),
           "trainable": sorted(got[1]), "ref_trainable": sorted(ref[1]), "sharding": sharding,
           "blocks": len(blocks(model)), "held": held_tensor_bytes(model)}
    queue.put((rank, out))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, folder, **kw) -> list[dict]:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, folder, queue, kw)) for r in range(world)]
    for p in procs:
        p.start()
    outs = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * world
    return [outs[r] for r in range(world)]


def one_process(folder, **kw) -> dict:
    """The unsharded run's loss and the sizes the bound is made of: the whole model's bytes, its
    4-bit bytes, and the largest block (adapters attached) whole."""
    from qforge.dist import local_quantised_bytes
    from qforge.train.run import load_for_method
    model, _ = load_for_method(config(folder, **kw), torch.device("cpu"))
    whole = held_tensor_bytes(model)
    block_bytes = [held_tensor_bytes(b) for b in blocks(model)]
    loss, _ = loss_and_grads(model)
    return {"loss": loss, "whole": whole, "quantised": local_quantised_bytes(model)[1],
            "largest": max(block_bytes), "blocks": len(block_bytes)}


def check_ranks(outs: list[dict], single: dict, world: int) -> None:
    for out in outs:
        assert out["blocks"] == single["blocks"]
        assert out["trainable"] == out["ref_trainable"] and len(out["trainable"]) == single["blocks"] * 7 * 2
        assert out["same"] == out["trainable"], "adapters or gradients differ from load-then-shard"
        assert out["loss"] == out["ref_loss"]
        assert out["counts"] == out["ref_counts"]
        # The same rows through the same weights; only FSDP's gathers lie between: float32 rounding at most.
        assert abs(out["loss"] - single["loss"]) <= 1e-6 * single["loss"]
    by_rank = outs[0]["sharding"]["load_by_rank"]
    print(f"one process: whole {single['whole']} B, 4-bit {single['quantised']} B, largest block "
          f"{single['largest']} B; per rank: {by_rank}")
    for out, load in zip(outs, by_rank):
        # What the rank keeps: the whole model less (N-1)/N of its 4-bit bytes (more where more is
        # sharded), plus FSDP's padding of each sharded tensor to N equal chunks (< 1 %).
        kept = single["whole"] - single["quantised"] * (world - 1) / world
        assert load["held_after_load_bytes"] <= 1.01 * kept, (load, kept)
        # While loading: what it keeps plus one block whole (the root is read tensor by tensor, a
        # sharded tensor only for this rank's rows), never the whole model.
        assert load["load_peak_held_bytes"] <= 1.01 * kept + single["largest"], (load, kept, single)
        assert load["load_peak_held_bytes"] <= load["held_after_load_bytes"] + single["largest"]
        assert load["load_peak_held_bytes"] < single["whole"] - single["quantised"] / 4
        assert load["load_largest_whole_block_bytes"] <= single["largest"]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("untied"), tied=False)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_load_their_shards_and_match_load_then_shard(untied, world):
    outs = run_ranks(world, untied)
    check_ranks(outs, one_process(untied), world)


def test_float32_residual_and_a_prequantised_folder(untied, tmp_path):
    """A bitsandbytes 4-bit folder: its codes read as stored, not quantised; the embeddings and
    norms in float32 for the float32 residual."""
    folder = prequantised_folder(tmp_path / "bnb", untied)
    outs = run_ranks(2, folder, residual_dtype="float32")
    check_ranks(outs, one_process(folder, residual_dtype="float32"), 2)


def test_tied_embeddings(tmp_path):
    folder = tiny_folder(tmp_path / "tied", tied=True)
    outs = run_ranks(2, folder)
    check_ranks(outs, one_process(folder), 2)


def test_what_loads_whole_says_why():
    from qforge.train.sharded_load import why_not_sharded
    assert why_not_sharded(config("x")) is None
    assert "hqq4" in why_not_sharded(config("x", quant_type="hqq4"))
    assert "LoftQ" in why_not_sharded(config("x", loftq_iters=1))
    assert "adapter" in why_not_sharded(config("x", adapter="a"))
    assert "lora" in why_not_sharded(config("x", method="lora"))


@pytest.mark.slow
def test_the_embedded_model_loads_sharded():
    """SmolLM2-135M (its cached bitsandbytes folder): 30 blocks; the tied embeddings (the root)
    are the largest tensor read whole."""
    outs = run_ranks(2, "smollm2")
    check_ranks(outs, one_process("smollm2"), 2)


def test_held_tensor_bytes_counts_each_storage_once_and_no_meta_tensor():
    from torch import nn

    from qforge.nn import AdaptedLinear
    tied = nn.Module()
    tied.emb = nn.Embedding(10, 4)
    tied.head = nn.Linear(4, 10, bias=False)
    tied.head.weight = tied.emb.weight
    assert held_tensor_bytes(tied) == 10 * 4 * 4
    with torch.device("meta"):
        assert held_tensor_bytes(nn.Linear(64, 64)) == 0
    torch.manual_seed(0)
    layer = AdaptedLinear.quantized(nn.Linear(128, 64, bias=False), double_quant=False)
    state = layer.base.quant_state  # 8192 values: 4096 packed bytes, 128 float32 absmax, the 16-value code
    assert held_tensor_bytes(layer) == 4096 + 128 * 4 + 16 * 4 == (
        state.packed.numel() + state.absmax.numel() * 4 + state.code.numel() * 4)
