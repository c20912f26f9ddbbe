"""A Mixtral checkpoint as transformers writes it (per-expert w1/w2/w3) trained end to end by
`run_training`: the loader merges the experts and holds them in 4 bits, LoRA goes on every linear
layer and on the experts, the loss falls, and PEFT loads the saved adapter (its `target_parameters`)
onto transformers' model with the dequantised weights and gives qforge's logits."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qforge.train.config import TrainConfig
from tests.fixtures import dequantized_moe, tiny_mixtral_folder

ROWS = [{"conversations": [{"from": "human", "value": f"w{i} w{i + 1} w{i + 2}"},
                           {"from": "gpt", "value": f"w{i + 3} w9 w9"}]} for i in range(24)]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return tiny_mixtral_folder(tmp_path_factory.mktemp("mixtral"))


def test_mixtral_folder_trains_with_4bit_experts_and_peft_reads_the_adapter(tmp_path, mixtral_dir):
    from peft import PeftModel

    from qforge.adapters.peft_format import load_adapter
    from qforge.model.load import load_model
    from qforge.model.surgery import expert_layers
    from qforge.train.run import run_training

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = TrainConfig(model=str(mixtral_dir), data=str(data), rank=4, alpha=8, dropout=0.0, batch_size=4,
                      max_seq_len=64, max_steps=20, compute_dtype="float32", output_dir=str(tmp_path / "out"),
                      warmup_steps=0, lr=5e-3, lr_scheduler="constant")
    _, summary = run_training(cfg, log=lambda *_: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3  # 4.48 -> 3.79 measured
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]

    ours, _ = load_model(mixtral_dir, compute_dtype=torch.float32)
    assert len(list(expert_layers(ours))) == 2  # 4-bit experts in both layers
    load_adapter(ours, adapter)
    ours.eval()
    dense = AutoModelForCausalLM.from_pretrained(str(mixtral_dir), dtype=torch.float32)
    theirs = PeftModel.from_pretrained(dequantized_moe(ours, dense), str(adapter)).eval()
    ids = torch.randint(5, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=2e-5, atol=2e-5)
