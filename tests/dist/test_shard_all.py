"""Everything trainable sharded (qforge.dist.shard): two gloo processes on a tiny random model
against the same steps on whole tensors.

The claim checked bit for bit: given the same (reduced, clipped) gradients, the 8-bit AdamW step on
each rank's shards is the one-process step on the whole tensors -- every code, every absmax, every
updated weight -- because each shard starts on a 256-value block boundary. The reference optimiser
here steps whole copies of the parameters with the gathered whole gradients; the sharded one steps
the shards; their consolidated state must be equal (torch.equal), not close.
"""
import io
import os
import socket

import pytest
import torch
from torch import nn

from qforge.dist.shard import keeps_blocks

HIDDEN, RANK = 256, 16  # lora_A [16, 256] = 4096 values: the smallest with 8-bit state


def tiny_sharded_model(seed: int = 0):
    from qforge.model import surgery
    from qforge.nn import LoraSpec
    from tests.fixtures import quantize_all, tiny_llama
    model = quantize_all(tiny_llama(hidden=HIDDEN, vocab=64, tied=True, seed=seed, max_position_embeddings=64))
    surgery.add_adapter(model, "default", LoraSpec(r=RANK, alpha=16, dropout=0.0, dtype=torch.float32))
    model = surgery.prepare_for_kbit_training(model)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: draw it so that A's gradients are not zero
                p.normal_(std=0.05)
    return model


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        out = _two_steps()
        if rank == 0:
            queue.put(_bytes(out))  # bytes, not shared memory: this process exits before the parent reads
    except BaseException as exc:  # the parent reports it rather than waiting for a timeout
        queue.put(_bytes({"error": f"rank {rank}: {type(exc).__name__}: {exc}"}))
        raise
    finally:
        torch.distributed.destroy_process_group()


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _two_steps() -> dict:
    from qforge.dist import init_group
    from qforge.dist.consolidate import local_optimizer_state, whole_optimizer_state
    from qforge.dist.grads import clip_gradients, reduce_gradients
    from qforge.dist.shard import held_bytes, shard_base
    from qforge.optim import AdamW8bit
    from qforge.train.data import collate
    from tests.train.test_loop import copy_task

    group = init_group(timeout_s=60)
    model = tiny_sharded_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reference = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    shard_base(model, group, torch.float32)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = AdamW8bit(params, lr=1e-3)
    ref_opt = AdamW8bit([reference[n] for n in names], lr=1e-3)
    data = copy_task()
    out = {"norms": [], "losses": []}
    for step in range(2):
        batch = list(range(4 * step, 4 * step + 4))
        n_tok = int((collate([data[i] for i in batch], 0)["labels"][:, 1:] != -100).sum())
        rows, weight = group.rows(batch)
        b = collate([data[i] for i in rows], 0)
        share = weight * int((b["labels"][:, 1:] != -100).sum()) / n_tok
        loss = model(**b, use_cache=False).loss
        (loss * share).backward()
        reduce_gradients(params, group)
        norm = torch.nn.utils.get_total_norm([p.grad.full_tensor() for p in params])  # torch's, whole tensors
        out["norms"].append((float(clip_gradients(params, 0.05, group)), float(norm)))
        for n, p in zip(names, params):  # the reference steps with the same (clipped) gradients, whole
            reference[n].grad = p.grad.full_tensor()
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        out["losses"].append(group.sum([loss.item() * share])[0])
    whole = whole_optimizer_state(opt, group)
    out["held"] = group.gather(held_bytes(model, opt))
    out["params"] = {n: (p.detach().full_tensor(), reference[n].detach().clone()) for n, p in zip(names, params)}
    # the whole state cut back to shards, loaded into a fresh optimiser: the same local state
    fresh = AdamW8bit(params, lr=1e-3)
    fresh.load_state_dict(local_optimizer_state(group.broadcast(whole), fresh))
    out["reloaded_equal"] = group.gather(all(
        torch.equal(a, b) for p in params for k, a in opt.state[p].items() if torch.is_tensor(a)
        for b in [fresh.state[p][k]]))
    if group.is_main:
        out["state"], out["ref_state"] = whole, ref_opt.state_dict()
    out["torch_adamw"] = _torch_adamw_round_trip(model, params, names, reference, group, data)
    return out


def _torch_adamw_round_trip(model, params, names, reference, group, data) -> bool:
    """torch's AdamW keeps DTensor state: one step on the shards equals the whole step, and its
    state consolidated then cut back (as DTensors) loads into a fresh optimiser unchanged."""
    from qforge.dist.consolidate import local_optimizer_state, whole_optimizer_state
    from qforge.train.data import collate
    rows, _ = group.rows(list(range(8, 12)))
    (model(**collate([data[i] for i in rows], 0), use_cache=False).loss / group.world).backward()
    opt, ref_opt = torch.optim.AdamW(params, lr=1e-3), torch.optim.AdamW([reference[n] for n in names], lr=1e-3)
    for n, p in zip(names, params):
        reference[n].grad = p.grad.full_tensor()
    opt.step()
    ref_opt.step()
    whole = whole_optimizer_state(opt, group)
    fresh = torch.optim.AdamW(params, lr=1e-3)
    fresh.load_state_dict(local_optimizer_state(group.broadcast(whole), fresh))
    whole_of = lambda t: t.full_tensor() if t.dim() else t  # noqa: E731  (the step count is a plain 0-d tensor)
    same = all(torch.equal(whole_of(a), whole_of(fresh.state[p][k])) for p in params for k, a in opt.state[p].items())
    if group.is_main:
        ref = ref_opt.state_dict()["state"]
        same = same and all(torch.equal(whole["state"][i][k], v) for i, s in ref.items() for k, v in s.items())
    return all(group.gather(same) or [True])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two():
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = torch.load(io.BytesIO(queue.get(timeout=300)), weights_only=False)
    for p in procs:
        p.join(timeout=60)
    assert "error" not in got, got["error"]
    assert [p.exitcode for p in procs] == [0, 0]
    return got


def test_the_sharded_8bit_step_is_the_whole_step_bit_for_bit(two):
    state, ref = two["state"], two["ref_state"]
    assert state["state"].keys() == ref["state"].keys()
    eight_bit = 0
    for i, s in ref["state"].items():
        got = state["state"][i]
        assert got.keys() == s.keys()
        for key, value in s.items():
            if torch.is_tensor(value):
                assert got[key].shape == value.shape and torch.equal(got[key], value), (i, key)
            else:
                assert got[key] == value
        eight_bit += "exp_avg_codes" in s
    assert eight_bit >= 10  # the 8-bit path was exercised (q/o/gate/up/down's A and B at least)
    for name, (sharded, whole) in two["params"].items():
        assert torch.equal(sharded, whole), name
    assert two["reloaded_equal"] == [True, True]


def test_torch_adamw_keeps_dtensor_state_and_round_trips(two):
    assert two["torch_adamw"] is True


def test_the_clipping_norm_is_the_global_one(two):
    for sharded, whole in two["norms"]:
        assert abs(sharded - whole) <= 1e-6 * whole, (sharded, whole)
    assert two["norms"][0][0] > 0.05  # the clip was applied (max_norm 0.05)


def test_each_rank_holds_half_of_every_component(two):
    for held in two["held"]:
        for key in ("base", "adapters", "gradients", "optimizer", "embeddings"):
            assert held[key + "_whole"] > 0
            assert 0.45 <= held[key] / held[key + "_whole"] <= 0.55, (key, held[key], held[key + "_whole"])
        assert held["experts"] == held["experts_whole"] == 0
    for key in ("base", "adapters", "embeddings"):  # the ranks' parts make the whole
        assert sum(h[key] for h in two["held"]) >= two["held"][0][key + "_whole"]


def test_a_shard_that_would_cut_an_8bit_block_keeps_the_parameter_whole():
    trainable = nn.Parameter(torch.zeros(258, 16))  # 4128 values: 8-bit state; 129 rows a rank = 2064 values
    assert not keeps_blocks(trainable, 2)
    assert keeps_blocks(nn.Parameter(torch.zeros(256, 16)), 2)  # 128 x 16 = 2048 = 8 blocks
    assert keeps_blocks(nn.Parameter(torch.zeros(258, 16), requires_grad=False), 2)  # frozen: no state
    assert keeps_blocks(nn.Parameter(torch.zeros(100, 16)), 3)  # 1600 values: 32-bit state, element-wise
