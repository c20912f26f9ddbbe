"""Quantisation fidelity of NF4, FP4 and INT4, with and without double quantisation.

    .venv/bin/python benchmarks/quant_fidelity.py

Prints a markdown table (MSE, SQNR, bits per parameter) on N(0,1), Student-t (df=5) and real
SmolLM2-135M weights, then a last line of name=value figures: the MSE of FP4 and INT4 relative to
NF4 (above 1 means NF4 is better) per dataset, double-quantised.
"""
from qforge.model.embedded import smollm2_sample_weights
from qforge.quant.fidelity import fidelity_table, format_table, standard_datasets


def main() -> None:
    rows = fidelity_table(standard_datasets(weights={"smollm2": smollm2_sample_weights()}))
    print(format_table(rows))
    mse = {(r.dataset, r.fmt): r.mse for r in rows}
    figures = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        for fmt in ("fp4", "int4"):
            figures.append(f"{fmt}_vs_nf4_mse_{dataset}={mse[dataset, fmt + '+dq'] / mse[dataset, 'nf4+dq']:.3f}")
    print(" ".join(figures))


if __name__ == "__main__":
    main()
