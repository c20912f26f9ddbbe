"""The loop's pure parts: schedule, recipe parsing, atomic checkpoints."""
import math

import pytest
import torch
import yaml

from qforge.fileio import atomic_folder
from qforge.train.checkpoint import latest_checkpoint, read_checkpoint, restore_checkpoint, save_checkpoint
from qforge.train.config import TrainConfig
from qforge.train.schedule import lr_at


def test_cosine_schedule_with_warmup_and_floor():
    lrs = [lr_at(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))            # rising warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))            # then never rising
    assert lrs[-1] == pytest.approx(1e-4)                              # ends at the floor
    mid = 10 + (100 - 10 - 1) / 2
    assert lr_at(int(mid), 100, 1e-3, 10, 0.1) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_recipe_keys_are_flag_names_and_flags_win(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"lr": 1e-3, "max-steps": 7, "method": "lora"}))
    cfg = TrainConfig.from_yaml(p, {"lr": 5e-4})
    assert (cfg.lr, cfg.max_steps, cfg.method) == (5e-4, 7, "lora")
    assert TrainConfig.from_yaml(p).lr == 1e-3
    assert yaml.safe_load(cfg.to_yaml())["max_steps"] == 7


@pytest.mark.parametrize("content,match", [
    ({"lr": 1e-3, "learning_rate": 2}, "learning_rate"),
    ({"method": "sft"}, "method"),
    ({"batch_size": 0}, "batch_size"),
    ("- just\n- a list\n", "mapping"),
    ("lr: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_name_the_problem(tmp_path, content, match):
    p = tmp_path / "bad.yaml"
    p.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_yaml(p)


def test_checkpoint_round_trip_restores_params_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, 5, {"losses": [1.0]})
    expected_draw = torch.rand(3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1)
    other_opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = restore_checkpoint(read_checkpoint(latest_checkpoint(tmp_path)), model, other_opt)
    assert state == {"step": 5, "losses": [1.0]}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(torch.rand(3), expected_draw)
    assert other_opt.state_dict()["state"][0]["step"] == 1


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model, opt, 1, {})

    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_folder(tmp_path / "step-000002", crash)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_a_checkpoint_of_a_lora_model_holds_its_peft_adapter(tmp_path):
    """Each checkpoint also writes the adapter in PEFT format (so a server can serve checkpoint N)."""
    from qforge.adapters import load_adapter
    from qforge.model.surgery import add_adapter, linear_names, quantize_linears, select_targets
    from qforge.nn import LoraSpec

    def tiny():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        quantize_linears(m, select_targets(linear_names(m), "all-linear"), compute_dtype=torch.float32)
        return m

    model = tiny()
    add_adapter(model, "default", LoraSpec(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape))
    x = torch.randn(3, 16)
    want = model(x)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    folder = save_checkpoint(tmp_path, model, opt, 3, {})
    other = tiny()
    load_adapter(other, folder / "adapter", name="ckpt")
    from qforge.model.surgery import set_active_adapter
    set_active_adapter(other, "ckpt")
    assert torch.allclose(other(x), want, atol=1e-6)
    plain = save_checkpoint(tmp_path, torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 0.1),
                            4, {})
    assert not (plain / "adapter").exists()  # no adapter: no folder
