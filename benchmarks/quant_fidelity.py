"""Quantisation fidelity of NF4, FP4 and INT4 (with and without double quantisation) and HQQ at 4, 3
and 2 bits (group size 64, scales and zeros in float16).

    .venv/bin/python benchmarks/quant_fidelity.py

Prints a markdown table (MSE, SQNR, bits per parameter) on N(0,1), Student-t (df=5) and real
SmolLM2-135M weights, then a last line of name=value figures: the MSE of FP4 and INT4 relative to
NF4 (above 1 means NF4 is better) per dataset, double-quantised; and hqqN_vs_oracle_mse, qforge's
HQQ error over the `hqq` package's on the same weights (all datasets together; 1.000 = the same).
"""
import torch

from qforge.model.embedded import smollm2_sample_weights
from qforge.quant.fidelity import fidelity_table, format_table, measure_hqq, standard_datasets

HQQ_BITS = (4, 3, 2)


def oracle_hqq_sq_error(weight: torch.Tensor, nbits: int, group_size: int = 64) -> float:
    """Sum of squared errors of the `hqq` package's own quantiser (BaseQuantizeConfig's settings)."""
    from hqq.core.quantize import Quantizer
    w = weight.float().reshape(-1, group_size)
    packed, meta = Quantizer.quantize(w, nbits=nbits, group_size=group_size, axis=1, round_zero=nbits == 4,
                                      device="cpu")
    meta["compute_dtype"] = torch.float32
    return (Quantizer.dequantize(packed, meta) - w).pow(2).sum().item()


def main() -> None:
    datasets = standard_datasets(weights={"smollm2": smollm2_sample_weights()})
    rows = fidelity_table(datasets)
    rows += [measure_hqq(name, w, nbits) for name, w in datasets.items() for nbits in HQQ_BITS]
    print(format_table(rows))
    mse = {(r.dataset, r.fmt): r.mse for r in rows}
    figures = []
    for dataset in datasets:
        for fmt in ("fp4", "int4"):
            figures.append(f"{fmt}_vs_nf4_mse_{dataset}={mse[dataset, fmt + '+dq'] / mse[dataset, 'nf4+dq']:.3f}")
    for nbits in HQQ_BITS:
        ours = sum(mse[name, f"hqq{nbits}"] * w.numel() for name, w in datasets.items())
        theirs = sum(oracle_hqq_sq_error(w, nbits) for w in datasets.values())
        figures.append(f"hqq{nbits}_vs_oracle_mse={ours / theirs:.4f}")
    print(" ".join(figures))


if __name__ == "__main__":
    main()
