"""--offload-activations: the saved-tensor hooks leave the training result unchanged, never move the
model's own tensors, and on the CPU the run says the option changes nothing there."""
import pytest
import torch

from qforge.train import offload
from qforge.train.loop import train_loop
from qforge.train.loss import causal_lm_loss

from .test_loop import TOKENIZER, config, copy_task, tiny_model


def adapter_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_run_with_the_hooks_equals_the_run_without(tmp_path, monkeypatch):
    """The loop with the hooks forced on (on the CPU they copy to fresh host tensors, as they would
    copy to pinned memory from a GPU): the same losses and adapters, bit for bit."""
    data = copy_task()
    plain_model = tiny_model()
    plain = train_loop(plain_model, TOKENIZER, data, None, config(tmp_path / "a", max_steps=4), log=lambda *_: None)
    made, real = [], offload.ActivationOffload

    def forced(model, device):
        made.append(real(model, device, on_cpu=True, min_bytes=0))
        return made[-1]

    monkeypatch.setattr(offload, "ActivationOffload", forced)
    hooked_model = tiny_model()
    hooked = train_loop(hooked_model, TOKENIZER, data, None,
                        config(tmp_path / "b", max_steps=4, offload_activations=True), log=lambda *_: None)
    assert len(made) == 1 and made[0].offloaded_bytes > 0
    assert hooked.losses == plain.losses
    a, b = adapter_values(plain_model), adapter_values(hooked_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_s_own_tensors_are_never_offloaded():
    model = tiny_model()
    model.train()
    moved = []
    hooks = offload.ActivationOffload(model, torch.device("cpu"), on_cpu=True, min_bytes=0)
    real_pack = hooks._pack

    def pack(tensor):
        out = real_pack(tensor)
        if not isinstance(out, torch.Tensor):
            moved.append(tensor.untyped_storage().data_ptr())
        return out

    hooks._pack = pack
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with hooks:
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    loss.backward()
    assert moved and not set(moved) & hooks.model_storages
    packed = {id(m.base.quant_state.packed) for m in model.modules() if hasattr(m, "base")}
    assert packed and len(hooks.model_storages) >= len(packed)  # the 4-bit codes count as the model's


def test_on_the_cpu_the_run_says_it_changes_nothing(tmp_path):
    data = copy_task()
    lines = []
    result = train_loop(tiny_model(), TOKENIZER, data, None,
                        config(tmp_path, max_steps=1, offload_activations=True), log=lines.append)
    assert any("changes nothing here" in str(line) for line in lines)
    assert len(result.losses) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves GPU activations to the host")
def test_on_cuda_the_result_equals_the_run_without(tmp_path):
    data = copy_task()
    plain_model, hooked_model = tiny_model().cuda(), tiny_model().cuda()
    plain = train_loop(plain_model, TOKENIZER, data, None, config(tmp_path / "a", max_steps=3), log=lambda *_: None,
                       device=torch.device("cuda"))
    lines = []
    hooked = train_loop(hooked_model, TOKENIZER, data, None,
                        config(tmp_path / "b", max_steps=3, offload_activations=True), log=lines.append,
                        device=torch.device("cuda"))
    assert any("wait in host memory" in str(line) for line in lines)
    torch.testing.assert_close(torch.tensor(hooked.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
