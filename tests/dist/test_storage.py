"""The float storage FSDP shards (same bytes, same products, same checkpoint keys), the single-process
Group, and a fast 2-process gloo check on a tiny Llama: the sharded model's loss and adapter
gradients equal the whole model's."""
import os
import socket

import pytest
import torch
from torch import nn

from qforge.dist import Group, local_quantised_bytes
from qforge.dist.shard import blocks
from qforge.nn import AdaptedLinear, LoraSpec, Quant4bitBase
from qforge.nn.bases import bytes_as
from qforge.nn.dropout import HashDropout
from tests.numerics import grad_atol


def layer(out_f=6, in_f=3, seed=0):  # 18 values: 9 packed bytes, an odd number to pad
    torch.manual_seed(seed)
    lin = AdaptedLinear.quantized(nn.Linear(in_f, out_f), compute_dtype=torch.float32)
    lin.add_adapter("a", LoraSpec(r=2, alpha=4, dropout=0.0, dtype=torch.float32))
    nn.init.normal_(lin.adapters["a"].lora_B.weight)
    return lin


def test_bytes_as_pads_to_whole_elements():
    raw = torch.arange(9, dtype=torch.uint8)
    for dtype, n in ((torch.bfloat16, 5), (torch.float32, 3)):
        t = bytes_as(raw, dtype)
        assert t.dtype == dtype and t.shape == (n,)
        assert t.view(torch.uint8)[:9].tolist() == raw.tolist() and t.view(torch.uint8)[9:].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_float_storage_keeps_bytes_products_and_checkpoint_keys(dtype, double_quant):
    torch.manual_seed(0)
    plain = AdaptedLinear.quantized(nn.Linear(70, 6), double_quant=double_quant, compute_dtype=torch.float32)
    plain.add_adapter("a", LoraSpec(r=2, alpha=4, dropout=0.0, dtype=torch.float32))
    stored = AdaptedLinear(Quant4bitBase(plain.base.quant_state), plain.bias, torch.float32)
    stored.add_adapter("a", LoraSpec(r=2, alpha=4, dropout=0.0, dtype=torch.float32))
    stored.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    stored.set_base(stored.base.to_sharded(dtype))

    assert isinstance(stored.weight, nn.Parameter) and stored.weight.dtype == dtype and not stored.weight.requires_grad
    assert stored.weight.dim() == 1 and stored.weight_absmax.dim() == 1
    after = stored.state_dict()
    assert after.keys() == before.keys()  # bitsandbytes' keys, no storage key
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    x = torch.randn(4, 70, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = plain(x), stored(x2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)
    with pytest.raises(ValueError, match="already"):
        stored.set_base(stored.base.to_sharded(dtype))


def test_local_quantised_bytes_counts_codes_and_absmax():
    lin = layer(out_f=64, in_f=64)
    held, whole = local_quantised_bytes(lin)
    st = lin.base.quant_state
    assert held == whole == st.packed.numel() + st.absmax.numel() * st.absmax.element_size()
    lin.set_base(lin.base.to_sharded(torch.float32))
    assert local_quantised_bytes(lin) == (held, held)  # 2048 + 64 bytes: already whole float32s


def test_single_process_group_is_the_identity():
    g = Group()
    assert g.is_main and not g.distributed
    assert g.rows([5, 6, 7]) == ([5, 6, 7], 1.0)
    assert g.sum([1.5, 2]) == [1.5, 2] and g.any(True) and not g.any(False)
    assert g.gather("x") == ["x"] and g.broadcast({"a": 1}) == {"a": 1}
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    g.sum_gradients([p])
    g.copy_from_rank0([p])
    g.barrier()
    assert p.grad.tolist() == [2.0, 2.0, 2.0]


def test_rows_split_a_global_batch_and_an_idle_rank_runs_at_weight_zero():
    assert Group(rank=0, world=2).rows([1, 2, 3, 4, 5]) == ([1, 3, 5], 1.0)
    assert Group(rank=1, world=2).rows([1, 2, 3, 4, 5]) == ([2, 4], 1.0)
    assert Group(rank=1, world=2).rows([9]) == ([9], 0.0)


# ---- two processes, gloo ------------------------------------------------------------------
def _tiny_loss_and_grads(rank: int, world: int, port: int, out: dict):
    if world > 1:  # a spawned process of its own
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
    from qforge.dist import init_group, shard_base
    from qforge.dist.grads import reduce_gradients
    from qforge.nn.bases import is_sharded
    from qforge.train.data import collate
    from tests.train.test_loop import copy_task, tiny_model

    group = init_group(timeout_s=60) if world > 1 else Group()
    model = tiny_model()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, HashDropout)):  # each rank sees other rows: no random masks
            m.p = 0.0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    whole = local_quantised_bytes(model)[1]
    if group.distributed:
        shard_base(model, group, torch.bfloat16)
    data = copy_task()
    batch = list(range(5))
    n_tok = int((collate([data[i] for i in batch], 0)["labels"][:, 1:] != -100).sum())
    rows, weight = group.rows(batch)
    b = collate([data[i] for i in rows], 0)
    share = weight * int((b["labels"][:, 1:] != -100).sum()) / n_tok
    loss = model(**b, use_cache=False).loss
    (loss * share).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reduce_gradients([p for _, p in trainable], group)  # FSDP reduce-scattered the sharded ones
    total = group.sum([loss.item() * share])[0]
    held = local_quantised_bytes(model)[0]
    grads = {n: (p.grad.full_tensor() if is_sharded(p.grad) else p.grad).numpy().copy() for n, p in trainable}
    if group.is_main:
        out.update(loss=total, grads=grads, held=held, whole=whole,
                   blocks=len(blocks(model)))
    return out


def _worker(rank, world, port, queue):
    out = _tiny_loss_and_grads(rank, world, port, {})
    if rank == 0:
        queue.put(out)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_loss_and_gradients():
    import torch.multiprocessing as mp
    ref = _tiny_loss_and_grads(0, 1, 0, {})
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert got["blocks"] == 2
    assert abs(got["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"])
    from qforge.train.data import collate
    from tests.train.test_loop import copy_task
    # each rank sums its rows' contributions, then the ranks' sums are added: another order
    tokens = collate(copy_task()[:5], 0)["input_ids"].numel()
    for name, g in ref["grads"].items():
        g = torch.from_numpy(g)
        torch.testing.assert_close(torch.from_numpy(got["grads"][name]), g, rtol=1e-5, atol=grad_atol(g, tokens))
    assert 0.45 <= got["held"] / got["whole"] <= 0.55
