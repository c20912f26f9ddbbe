"""MoE adapters served: LoRA on the routed experts (PEFT's target_parameters files) in the server's slots.
A mixed batch (rows on different adapters, or none) equals, row by row, the same adapter run alone by
the training layers (load_adapter: AdaptedExperts with the adapter active), on tiny 4-bit Mixtral and
Qwen3-MoE models."""
import copy

import pytest
import torch

from qforge.adapters import load_adapter, save_adapter
from qforge.model import surgery
from qforge.nn import LoraSpec
from qforge.serve import AdapterRegistry
from qforge.serve.lora_slots import SlotExperts, unwrap
from qforge.nn.experts import AdaptedExperts
from tests.fixtures import quantized_moe, randomise_adapters, tiny_moe

ADAPTERS = {  # name -> (rank, targets): experts only, and experts with the attention projections
    "experts": (4, ["experts.gate_up_proj", "experts.down_proj"]),
    "mixed": (2, ["q_proj", "v_proj", "experts.down_proj"]),
}


def saved_adapters(qmodel, root):
    """Each adapter of ADAPTERS trained-shaped on a copy of `qmodel` (random factors) and saved as PEFT files."""
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        model = copy.deepcopy(qmodel)
        surgery.add_adapter(model, name, LoraSpec(r=r, alpha=2 * r, dropout=0.0, dtype=torch.float32,
                                                  target_modules=targets))
        randomise_adapters(model, seed=seed + 1, std=0.1)
        save_adapter(model, root / name, name=name)
    return {name: root / name for name in ADAPTERS}


def logits_alone(qmodel, folder, ids):
    """The training layers' answer: the adapter loaded onto a copy of the model and active."""
    model = copy.deepcopy(qmodel)
    if folder is not None:
        load_adapter(model, folder)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_mixed_batch_of_moe_adapters_equals_each_adapter_alone(arch, tmp_path):
    qmodel = quantized_moe(tiny_moe(arch))
    folders = saved_adapters(qmodel, tmp_path)
    ids = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(0))
    rows = ["experts", "mixed", None, "mixed", "experts"]
    alone = {name: logits_alone(qmodel, folders.get(name), ids) for name in (None, *ADAPTERS)}
    assert (alone["experts"] - alone[None]).abs().max() > 1e-2  # the expert adapter changes the output

    served = copy.deepcopy(qmodel)
    registry = AdapterRegistry(served, "tiny", max_loaded=4)
    assert all(isinstance(m, SlotExperts) for _, m in surgery.expert_layers(served))
    for name, folder in folders.items():
        registry.add(name, folder, trusted=True)
        assert registry.acquire(name)
    with torch.no_grad():
        with registry.select(rows, ids.device):
            mixed = served(ids).logits
        for b, name in enumerate(rows):
            torch.testing.assert_close(mixed[b], alone[name][b], rtol=1e-5, atol=1e-5)
        for name in (None, *ADAPTERS):  # a batch of one adapter (or none)
            with registry.select([name] * len(rows), ids.device):
                torch.testing.assert_close(served(ids).logits, alone[name], rtol=1e-5, atol=1e-5)
        assert torch.equal(served(ids).logits, alone[None])  # outside a selection: the model as it was
    unwrap(served)
    assert all(type(m) is AdaptedExperts for _, m in surgery.expert_layers(served))
