"""Training checkpoints: written whole or not at all.

A checkpoint folder `step-000120/` holds trainable.safetensors (every trainable parameter by
name), optimizer.pt, rng.pt (torch's CPU generator and Python's `random`) and state.json (step,
the metrics so far). It is written under a temporary name, fsynced, then renamed, so a crash
mid-write leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_folder


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer, step: int, state: dict) -> Path:
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def write(tmp: Path) -> None:
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))

    return atomic_folder(folder / f"step-{step:06d}", write)


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> dict:
    """Restore parameters, optimiser and RNG from `path`; returns state.json's contents."""
    params = dict(model.named_parameters())
    for name, tensor in load_file(path / "trainable.safetensors").items():
        if name not in params:
            raise ValueError(f"{path}: checkpoint holds '{name}', which this model does not have")
        with torch.no_grad():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((path / "state.json").read_text())
