"""The planner counts a preference step: batch_size pairs are 2 * batch_size sequences through the
model (chosen and rejected in one batch); DPO's reference pass keeps no activations, so DPO and ORPO
cost the same, and that is SFT's cost at twice the rows."""
import pytest

from qforge import cli
from qforge.plan import as_arch, plan_run
from qforge.plan.policy import plan_for_config
from qforge.train.config import TrainConfig


@pytest.mark.parametrize("model", ["smollm2", "llama-3.1-8b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_dpo_step_is_two_sequences_per_pair(model, method):
    arch = as_arch(model)
    kw = dict(seq_len=512, rank=16, chunked_loss=True)
    sft = plan_run(arch, method, batch_size=4, **kw)
    dpo = plan_run(arch, method, batch_size=4, objective="dpo", **kw)
    orpo = plan_run(arch, method, batch_size=4, objective="orpo", **kw)
    doubled = plan_run(arch, method, batch_size=8, **kw)
    assert dpo.total > sft.total and dpo.activations > sft.activations
    assert dpo == orpo == doubled  # the reference pass (no_grad) adds nothing; no second model
    assert dpo.base_weights == sft.base_weights and dpo.optimizer_state == sft.optimizer_state


def test_full_dpo_would_hold_a_reference_copy():
    arch = as_arch("smollm2")
    sft, dpo = plan_run(arch, "full", batch_size=1), plan_run(arch, "full", batch_size=1, objective="dpo")
    assert dpo.base_weights == 2 * sft.base_weights
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        plan_run(arch, "qlora", objective="ppo")


def test_plan_for_config_reads_the_objective():
    sft = plan_for_config(TrainConfig(batch_size=2, max_seq_len=256), "smollm2")
    dpo = plan_for_config(TrainConfig(batch_size=2, max_seq_len=256, objective="dpo"), "smollm2")
    assert dpo.total > sft.total
    assert dpo == plan_for_config(TrainConfig(batch_size=4, max_seq_len=256), "smollm2")


def test_plan_command_takes_the_objective(capsys):
    assert cli.main(["plan", "--model", "smollm2", "--method", "qlora", "--seq-len", "512", "--batch-size", "2",
                     "--objective", "dpo"]) == 0
    dpo = capsys.readouterr().out
    assert "batch 2 pair(s) = 4 sequences (dpo)" in dpo
    assert cli.main(["plan", "--model", "smollm2", "--method", "qlora", "--seq-len", "512", "--batch-size", "2"]) == 0
    sft = capsys.readouterr().out
    total = lambda text: next(line for line in text.splitlines() if line.startswith("total"))  # noqa: E731
    assert total(dpo) != total(sft)
