"""The demo, shortened: QLoRA on the embedded model must visibly learn the JSON task."""
import json
from argparse import Namespace

import pytest


@pytest.mark.slow
def test_short_demo_raises_exact_match_by_30_points(tmp_path, capsys):
    from qforge.commands.demo import run

    assert run(Namespace(output_dir=str(tmp_path), max_steps=12, eval_rows=24, skip_fidelity=True, device="auto")) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exact_match_after"] - summary["exact_match_before"] >= 0.30, summary
    assert summary["final_loss"] < summary["first_loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "loss.png").exists()
    assert "before:" in capsys.readouterr().out
