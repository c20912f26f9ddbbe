"""The device a run uses, decided once from `--device` / TrainConfig.device and passed down.

    auto      CUDA when torch sees a GPU, else the CPU
    cpu       the CPU
    cuda      the current CUDA device
    cuda:N    CUDA device N
Nothing below the commands guesses a device: loading, the planner, the loop, evaluation,
generation and the serving engine take the torch.device resolved here (or the model's, once moved).
"""
from __future__ import annotations

import re

import torch

CHOICES_HELP = "auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A --device this machine cannot give (no GPU, no such index, unknown name)."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """torch.device for `spec`; DeviceError with one line saying why it cannot be had here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        raise DeviceError(f"--device {spec!r}: expected {CHOICES_HELP}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec}: no CUDA GPU is visible to torch on this machine "
                          f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); "
                          "use --device cpu")
    index = int(m.group(1) or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def add_device_argument(parser) -> None:
    """The --device flag every command that runs a model has."""
    parser.add_argument("--device", default="auto", help=f"where the model runs: {CHOICES_HELP} (default: auto)")


# The floating dtypes a command takes by name (--dtype, --compute-dtype): one table for every command.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
