"""The loop on a tiny random Llama with a 4-bit base: loss falls, resume reproduces the
uninterrupted curve exactly, Ctrl-C saves a checkpoint, a NaN loss stops the run cleanly."""
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from qforge.model import surgery
from qforge.nn import LoraSpec
from qforge.train.config import TrainConfig
from qforge.train.loop import TrainingDiverged, train_loop
from tests.fixtures import quantize_all, tiny_llama

TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=1)


def tiny_model(seed=0):
    model = quantize_all(tiny_llama(vocab=64, seed=seed, max_position_embeddings=64))
    surgery.add_adapter(model, "default", LoraSpec(r=4, alpha=8, dropout=0.1, dtype=torch.float32))
    return surgery.prepare_for_kbit_training(model)


def copy_task(n=48, seed=0):
    """Random prompts 'a b c ... |' answered by the same fixed reply: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    reply = [5, 9, 14, 20, 27, 35]
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, 64, (6,), generator=g).tolist() + [2]
        rows.append({"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply})
    return rows


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), lr=1e-2, batch_size=4, max_steps=12, compute_dtype="float32",
                warmup_ratio=0.1, seed=3, optimizer="paged_adamw_8bit")
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_outputs_are_written(tmp_path, device):
    data = copy_task()
    model = tiny_model().to(device)
    result = train_loop(model, TOKENIZER, data, data[:8], config(tmp_path, max_steps=25, eval_every=25),
                        log=lambda *_: None, device=torch.device(device))
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    assert len(result.losses) == 25
    assert sum(result.losses[-5:]) / 5 < 0.8 * sum(result.losses[:5]) / 5
    assert (tmp_path / "loss.png").stat().st_size > 1000
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 25 and '"eval_loss"' in lines[-1]


def test_resume_reproduces_the_uninterrupted_curve_exactly(tmp_path):
    data = copy_task()
    full = train_loop(tiny_model(), TOKENIZER, data, None, config(tmp_path / "a", grad_accum=2), log=lambda *_: None)

    def interrupt_at_5(record):
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    first = train_loop(tiny_model(), TOKENIZER, data, None, config(tmp_path / "b", grad_accum=2),
                       log=lambda *_: None, on_step=interrupt_at_5)
    assert first.interrupted and len(first.losses) == 5
    assert (tmp_path / "b" / "checkpoints" / "step-000005" / "trainable.safetensors").exists()
    fresh = tiny_model()  # the same base (it comes from the checkpoint's source), other adapter values
    for _, p in surgery.adapter_parameters(fresh):
        torch.nn.init.normal_(p.data)
    resumed = train_loop(fresh, TOKENIZER, data, None, config(tmp_path / "b", grad_accum=2, resume=True),
                         log=lambda *_: None)
    assert resumed.losses == full.losses  # exactly: same batches, dropout masks, optimiser state


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    data = copy_task()
    model = tiny_model()

    def poison(record):
        if record["step"] == 4:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="step 5: loss is nan"):
        train_loop(model, TOKENIZER, data, None, config(tmp_path, save_every=2), log=lambda *_: None, on_step=poison)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_paged_optimizer_spills_in_the_loop_and_says_how_much(tmp_path, monkeypatch):
    """Free device memory forced to 0 (as under an activation spike): the loop's paged 8-bit AdamW
    moves its state to host memory, logs it, and the run's losses are those of the unforced run."""
    from qforge.optim import paging
    data = copy_task()
    plain = train_loop(tiny_model(), TOKENIZER, data, None, config(tmp_path / "a", max_steps=4), log=lambda *_: None)
    real_init = paging.DevicePager.__init__
    monkeypatch.setattr(paging.DevicePager, "__init__",
                        lambda self, free_memory=None, log=None: real_init(self, lambda device: 0, log))
    lines = []
    forced = train_loop(tiny_model(), TOKENIZER, data, None, config(tmp_path / "b", max_steps=4), log=lines.append)
    assert forced.losses == plain.losses
    assert lines[0].startswith("optimizer state paged out to host memory: ") and "MiB" in lines[0]
    assert lines[-1].startswith("optimizer paging: 1 spill(s) to host memory")
