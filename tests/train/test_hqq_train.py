"""QLoRA over an HQQ base: TrainConfig's quant types, and `qforge train --quant-type hqq*` on a tiny
random Llama lowers the loss, trains only the adapters, and records the quant type the merge reads."""
import json

import pytest
import yaml

from qforge import cli
from qforge.train.config import TrainConfig
from tests.model.conftest import tiny_dir, tiny_tokenizer, write_tiny  # noqa: F401 (tiny_dir: a fixture)

ROWS = [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"}, {"role": "assistant", "content": f"w{i + 2} w7"}]}
        for i in range(6)]


def test_train_config_quant_types():
    for q in ("nf4", "fp4", "hqq4", "hqq3", "hqq2"):
        assert TrainConfig(quant_type=q).quant_type == q
    with pytest.raises(ValueError, match=r"quant_type: expected one of nf4, fp4, hqq4, hqq3, hqq2, got 'hqq5'"):
        TrainConfig(quant_type="hqq5")
    with pytest.raises(ValueError, match="hqq_group_size: must be a positive integer, got 0"):
        TrainConfig(quant_type="hqq4", hqq_group_size=0)


@pytest.mark.parametrize("quant_type, group, keep", [("hqq4", 64, "--no-keep-base-outputs"),
                                                     ("hqq2", 32, "--keep-base-outputs")])  # selective checkpointing
def test_train_on_an_hqq_base_lowers_the_loss(tmp_path, tiny_dir, quant_type, group, keep):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_dir), "--data", str(data), "--quant-type", quant_type,
            "--hqq-group-size", str(group), "--rank", "4", "--alpha", "8", "--batch-size", "6", "--max-seq-len", "32",
            "--max-steps", "6", "--lr", "1e-2", "--warmup-steps", "0", "--lr-scheduler", "constant",
            "--compute-dtype", "float32", "--output-dir", str(out), keep]
    assert cli.main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["quant_type"], saved["hqq_group_size"]) == (quant_type, group)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
