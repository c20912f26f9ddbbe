"""Selective checkpointing (qforge.nn.recompute): the recomputation takes the base products from
the tape, the gradients equal full checkpointing's and no checkpointing's, and a tape that is out
of step with the recomputation falls back to computing."""
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qforge.nn import AdaptedLinear, LoraSpec, recompute
from qforge.nn import bases


class Block(nn.Module):
    def __init__(self, dense: bool, inplace_tamper: bool = False):
        super().__init__()
        make = (lambda lin: AdaptedLinear.dense(lin, torch.float32)) if dense else \
            (lambda lin: AdaptedLinear.quantized(lin, compute_dtype=torch.float32))
        self.up, self.down = make(nn.Linear(32, 64)), make(nn.Linear(64, 32))
        for layer in (self.up, self.down):
            a = layer.add_adapter("a", LoraSpec(r=4, alpha=8, dropout=0.1, dtype=torch.float32))
            nn.init.normal_(a.lora_B.weight, std=0.1)
        self.inplace_tamper = inplace_tamper

    def forward(self, x):
        if self.inplace_tamper:
            b = self.up.base.product(x)
            h = b.clone()
            b.add_(100.0)  # changes the recorded output after use: the replay must not trust it
        else:
            h = self.up(x)
        return x + self.down(torch.nn.functional.gelu(h))


def grads(model, mode, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    h = x
    for block in model:
        if mode == "none":
            h = block(h)
        else:
            context_fn = recompute.keep_base_outputs if mode == "selective" else recompute.recompute_everything
            h = checkpoint(block, h, use_reentrant=False, context_fn=context_fn)
    h.square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dense", [False, True])
def test_selective_equals_full_and_no_checkpointing_and_skips_base_products(dense, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(Block(dense), Block(dense))
    for p in model.parameters():
        p.requires_grad = "adapters" in str([n for n, q in model.named_parameters() if q is p])
    x = torch.randn(3, 6, 32, requires_grad=True)
    computed = []
    real = recompute.base_product

    def counting(key, inp, out_features, compute):
        return real(key, inp, out_features, lambda: computed.append(1) or compute())

    monkeypatch.setattr(bases.recompute, "base_product", counting)
    results = {}
    for mode in ("none", "full", "selective"):
        computed.clear()
        results[mode] = (grads(model, mode, x), len(computed))
    for name, g in results["none"][0].items():
        # selective replays what the plain forward computed: the same bits; full recomputation
        # orders the layer differently (low-rank branch first, separate sum): equal to rounding
        assert torch.equal(results["selective"][0][name], g), name
        torch.testing.assert_close(results["full"][0][name], g, rtol=1e-5, atol=1e-5, msg=name)
    # 2 blocks x 2 layers: 4 base products forward; full checkpointing recomputes the up
    # products (down's is skipped by torch's early stop), selective recomputes none
    assert results["none"][1] == 4
    assert results["full"][1] == 6
    assert results["selective"][1] == 4


def test_a_tampered_tape_entry_is_recomputed_not_replayed():
    torch.manual_seed(0)
    block = Block(dense=False, inplace_tamper=True)
    for n, p in block.named_parameters():
        p.requires_grad = "adapters" in n
    x = torch.randn(2, 5, 32, requires_grad=True)
    want = grads(nn.Sequential(block), "none", x)
    got = grads(nn.Sequential(block), "selective", x)
    assert set(got) == set(want) and want
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-6, msg=name)


def test_outside_checkpointing_nothing_is_recorded():
    layer = AdaptedLinear.quantized(nn.Linear(16, 8), compute_dtype=torch.float32)
    layer(torch.randn(2, 16))
    assert recompute._current() is None


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_a_retained_graph_recomputes_twice(mode):
    """torch enters a layer's recompute context once per recomputation: a second backward through a
    retained graph must work and give twice the gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(False), Block(False))
    for n, p in model.named_parameters():
        p.requires_grad = "adapters" in n
    x = torch.randn(2, 5, 32, requires_grad=True)
    once = grads(model, mode, x)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    context_fn = recompute.keep_base_outputs if mode == "selective" else recompute.recompute_everything
    h = x
    for block in model:
        h = checkpoint(block, h, use_reentrant=False, context_fn=context_fn)
    loss = h.square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    for n, p in model.named_parameters():
        if n in once:
            torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-6, atol=1e-6, msg=n)


def test_float32_compute_under_bf16_autocast_replays_and_dense_backward_casts():
    """A float32-compute layer under bf16 autocast: the base output is bf16 while the input is
    float32; the tape still replays it (it compares input dtypes), and the dense base's backward
    multiplies in the gradient's dtype."""
    torch.manual_seed(0)
    for dense in (False, True):
        block = Block(dense)
        for n, p in block.named_parameters():
            p.requires_grad = "adapters" in n
        x = torch.randn(2, 5, 32, requires_grad=True)
        counts = []

        def spy(key, inp, out_features, compute, real=recompute.base_product):
            return real(key, inp, out_features, lambda: counts.append(1) or compute())

        bases.recompute.base_product, original = spy, recompute.base_product
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = checkpoint(block, x, use_reentrant=False, context_fn=recompute.keep_base_outputs)
            y.float().square().sum().backward()
        finally:
            bases.recompute.base_product = original
        assert len(counts) == 2, (dense, len(counts))  # up and down once each: nothing recomputed
        assert x.grad is not None and torch.isfinite(x.grad).all()
