"""The planner knows HQQ's bits per parameter: codes (4, 3.2 with ten 3-bit codes per int32, 2) plus a
float16 scale and zero per group of 64, the same figures the HQQ base stores."""
import pytest
import torch

from qforge import cli
from qforge.nn import HQQBase
from qforge.plan import as_arch, bits_per_param, parameter_count, plan_run


@pytest.mark.parametrize("quant_type, bits", [("hqq4", 4.5), ("hqq3", 3.7), ("hqq2", 2.5)])
def test_hqq_bits_per_parameter_are_what_the_base_stores(quant_type, bits):
    assert bits_per_param(quant_type) == pytest.approx(bits)
    base = HQQBase.from_weight(torch.randn(640, 1280), int(quant_type[3:]), 64)
    assert 8 * base.nbytes() / (640 * 1280) == pytest.approx(bits)
    assert bits_per_param(quant_type, group_size=128) == pytest.approx(bits - 0.25)


def test_plan_sizes_the_hqq_base():
    arch = as_arch("llama-3.1-70b")
    embeddings, norms = 2 * arch.vocab_size * arch.hidden_size, (2 * arch.num_layers + 1) * arch.hidden_size
    quantised = parameter_count(arch) - embeddings - norms
    plans = {q: plan_run(arch, "qlora", quant_type=q) for q in ("nf4", "hqq4", "hqq3", "hqq2")}
    for q in ("hqq4", "hqq3", "hqq2"):
        stored = plans[q].base_weights - 2 * embeddings - 4 * norms + plans[q].quant_constants
        assert stored * 8 / quantised == pytest.approx(bits_per_param(q), rel=1e-4)
    assert plans["hqq2"].total < plans["hqq3"].total < plans["nf4"].total < plans["hqq4"].total
    assert 0.126 < bits_per_param("nf4") - 4 < 0.128
    with pytest.raises(ValueError, match="unknown quant_type 'hqq5'"):
        plan_run(arch, "qlora", quant_type="hqq5")


def test_plan_command_prints_bits_per_parameter(capsys):
    assert cli.main(["plan", "--model", "smollm2", "--quant-type", "hqq3", "--method", "qlora"]) == 0
    assert "qlora base: hqq3, 3.700 bits per parameter" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["plan", "--model", "smollm2", "--quant-type", "hqq9"])
    assert "invalid choice: 'hqq9'" in capsys.readouterr().err
