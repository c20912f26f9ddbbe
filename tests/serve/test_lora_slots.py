"""Adapter slots (the serving side of multi-LoRA): a mixed batch through the slots equals each row run
alone with its adapter made active on the layer (LoRA of two ranks, DoRA, and rows without one)."""
import pytest
import torch
from torch import nn

from qforge.nn import AdaptedLinear, LoraSpec
from qforge.serve.lora_slots import LoraSlots, SlotLinear, SlotsFull, unwrap


def make_model(seed=0, base="nf4"):
    """One adapted layer (96 -> 80, float32 compute) with adapters p (LoRA), q (rsLoRA), d (DoRA),
    over a 4-bit base, a dense one, or the 4-bit codes in the sharded storage (qforge.dist)."""
    torch.manual_seed(seed)
    linear = nn.Linear(96, 80)
    layer = AdaptedLinear.dense(linear, torch.float32) if base == "dense" else \
        AdaptedLinear.quantized(linear, compute_dtype=torch.float32)
    if base == "sharded":
        layer.set_base(layer.base.to_sharded(torch.float32))
    specs = {"p": LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32),
             "q": LoraSpec(r=8, alpha=4, dropout=0.0, dtype=torch.float32, use_rslora=True),
             "d": LoraSpec(r=6, alpha=12, dropout=0.0, dtype=torch.float32, use_dora=True)}
    for name, spec in specs.items():
        a = layer.add_adapter(name, spec)
        nn.init.normal_(a.lora_B.weight, std=0.1)
        if spec.use_dora:
            with torch.no_grad():
                a.magnitude.mul_(torch.linspace(0.5, 1.5, 80))
    return nn.Sequential(layer)


def alone(layer, x, name):
    layer.active_adapter = name
    try:
        return layer(x)
    finally:
        layer.active_adapter = None


@pytest.mark.parametrize("shape", [(5, 7, 96), (5, 96)], ids=["BxT", "B"])
def test_mixed_batch_equals_each_row_alone(shape, device):
    model = make_model().to(device)
    layer = model[0]
    slots = LoraSlots(model, capacity=4, dtype=torch.float32)
    for name in ("p", "q", "d"):
        slots.load(name, {"0": layer.adapters[name]})
    assert model[0].A.device.type == model[0].B.device.type == torch.device(device).type  # slots on the model's device
    x = torch.randn(*shape).to(device)
    rows = ["p", "q", None, "d", "p"]
    with torch.no_grad(), slots.select(rows, x.device):
        mixed = model(x)
    with torch.no_grad():
        for b, name in enumerate(rows):
            torch.testing.assert_close(mixed[b], alone(layer, x[b:b + 1], name)[0], rtol=1e-5, atol=1e-5)
        for name in (None, "p", "d"):  # a batch of one adapter takes the slot's views
            with slots.select([name] * shape[0], x.device):
                torch.testing.assert_close(model(x), alone(layer, x, name), rtol=1e-5, atol=1e-5)


def test_slots_grow_fill_and_free():
    model = make_model()
    layer = model[0]
    slots = LoraSlots(model, capacity=2, dtype=torch.float32)
    assert slots.load("p", {"0": layer.adapters["p"]}) == 0
    assert tuple(model[0].A.shape) == (2, 4, 96)
    assert slots.load("q", {"0": layer.adapters["q"]}) == 1  # rank 8 > 4: every slot widens
    assert tuple(model[0].A.shape) == (2, 8, 96) and slots.rank == 8
    with pytest.raises(SlotsFull):
        slots.load("d", {"0": layer.adapters["d"]})
    slots.unload("p")
    assert not model[0].A[0].any() and slots.loaded() == ["q"]
    assert slots.load("d", {"0": layer.adapters["d"]}) == 0  # the freed slot is reused
    x = torch.randn(3, 96)
    with torch.no_grad(), slots.select(["q", "d", "q"], x.device):
        mixed = model(x)
    with torch.no_grad():
        torch.testing.assert_close(mixed[1], alone(layer, x[1:2], "d")[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[0], alone(layer, x[0:1], "q")[0], rtol=1e-5, atol=1e-5)
    # outside a selection the serving layer is the layer it replaced (its own active adapter)
    served = model[0]
    assert served.adapters is layer.adapters and served.base is layer.base
    with torch.no_grad():
        served.active_adapter = "q"
        torch.testing.assert_close(model(x), alone(layer, x, "q"))


@pytest.mark.parametrize("base", ["dense", "sharded"])
def test_slots_wrap_a_layer_twice_and_unwrap_it_with_its_base_shared(base):
    """The serving wrapper registers the layer's base on itself (FrozenBase.attach on a second
    host): the same tensors, so a second bank over the same model, serving, and unwrapping leave
    the base, its state dict and the layer's output as they were (DenseBase and
    ShardedQuant4bitBase could register only once before)."""
    model = make_model(base=base)
    layer = model[0]
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = {name: alone(layer, x, name) for name in ("p", "d")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    LoraSlots(model, capacity=2, dtype=torch.float32)
    slots = LoraSlots(model, capacity=2, dtype=torch.float32)  # re-wraps: the base attached a third time
    served = model[0]
    assert isinstance(served, SlotLinear) and served.base is layer.base and served.weight is layer.weight
    for name in ("p", "d"):
        slots.load(name, {"0": layer.adapters[name]})
    with torch.no_grad(), slots.select(["p", "d", None], x.device):
        mixed = model(x)
    torch.testing.assert_close(mixed[:2], torch.stack([before["p"][0], before["d"][1]]), rtol=1e-5, atol=1e-5)
    unwrap(model)
    plain = model[0]
    assert type(plain) is AdaptedLinear and plain.base is layer.base
    with torch.no_grad():
        for name in ("p", "d"):
            assert torch.equal(alone(plain, x, name), before[name])
    after = model.state_dict()
    assert sorted(after) == sorted(state) and all(torch.equal(after[k], state[k]) for k in state)
