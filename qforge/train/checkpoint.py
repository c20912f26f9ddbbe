"""Training checkpoints: written whole or not at all.

A checkpoint folder `step-000120/` holds trainable.safetensors (every trainable parameter by
name), optimizer.pt, rng.pt (torch's CPU generator and Python's `random`) and state.json (step,
the metrics so far). It is written under a temporary name, fsynced, then renamed, so a crash
mid-write leaves the previous checkpoint as the latest one. When the model carries a LoRA adapter
("default"), the folder also holds it as a PEFT adapter (`adapter/`), so a server can answer
with any checkpoint (`ft:...:ckpt-step-N`) without the trainer's state.

A run of several processes writes the same files from rank 0: the caller gathers the sharded
adapters and optimiser state whole first (qforge.dist.consolidate), so the files are the ones one
process writes, plus each rank's torch generator in rng.pt; restoring cuts them to each rank's
shards, so a checkpoint resumes with any number of processes.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..fileio import CorruptFile, atomic_folder, clean_temporaries, read_json, read_safetensors, read_torch


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer, step: int, state: dict,
                    rng_by_rank: list[torch.Tensor] | None = None) -> Path:
    """Write step-NNNNNN/ under `folder`. `optimizer`: an optimiser, or its state_dict (the whole
    one, qforge.dist.consolidate.whole_optimizer_state). `rng_by_rank`: every rank's torch
    generator state, when several processes train (this process's is written in any case)."""
    optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if rng_by_rank is not None and len(rng_by_rank) > 1:
        rng["torch_by_rank"] = rng_by_rank

    adapter = _peft_files(model)

    def write(tmp: Path) -> None:
        if adapter is not None:
            (tmp / ADAPTER_DIR).mkdir()
            save_file(adapter[1], tmp / ADAPTER_DIR / "adapter_model.safetensors", metadata={"format": "pt"})
            (tmp / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(adapter[0], indent=2, sort_keys=True))
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))

    return atomic_folder(folder / f"step-{step:06d}", write)


ADAPTER_DIR = "adapter"


def _peft_files(model: torch.nn.Module) -> tuple[dict, dict] | None:
    """(adapter_config.json dict, PEFT tensors) of the model's "default" adapter; None without one."""
    from ..adapters.peft_format import adapter_config, adapter_tensors

    try:
        return adapter_config(model, "default"), {k: v.cpu() for k, v in adapter_tensors(model, "default").items()}
    except ValueError:  # no layer carries a LoRA adapter (a full fine-tune)
        return None


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders under `folder`, oldest first (a temporary one left by a kill is not one)."""
    return sorted(p for p in Path(folder).glob("step-*") if (p / "state.json").is_file())


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents in memory (what rank 0 reads and sends to the other ranks).
    CorruptFile (naming the file) when one of its files cannot be read back."""
    path = Path(path)
    state = read_json(path / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptFile(path / "state.json", "not a checkpoint state (no integer 'step')")
    return {"path": str(path), "trainable": read_safetensors(path / "trainable.safetensors"),
            "optimizer": read_torch(path / "optimizer.pt"), "rng": read_torch(path / "rng.pt"), "state": state}


def read_latest_intact(folder: Path, log=print) -> tuple[Path | None, dict | None]:
    """(path, contents) of the newest checkpoint under `folder` that reads back whole; a corrupt
    newer one is skipped and `log` says which and why. Temporary folders of an interrupted write are
    removed first. (None, None) when there is no intact one."""
    for tmp in clean_temporaries(folder, max_depth=0):
        log(f"removed '{tmp.name}', left by a checkpoint write that was interrupted")
    for path in reversed(checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except (CorruptFile, FileNotFoundError) as exc:
            log(f"checkpoint {path.name} cannot be used: {exc}; falling back to the one before it")
    return None, None


def restore_checkpoint(contents: dict, model: torch.nn.Module, optimizer, rank: int = 0) -> dict:
    """Put `read_checkpoint`'s contents into `model`, `optimizer` and the generators (a sharded
    parameter and its optimiser state take this rank's part of the whole); rank r takes
    rank r's torch generator when the checkpoint has one (same number of processes), else rank 0's."""
    from ..dist.consolidate import load_whole_into, local_optimizer_state

    params = dict(model.named_parameters())
    for name, tensor in contents["trainable"].items():
        if name not in params:
            raise ValueError(f"{contents['path']}: checkpoint holds '{name}', which this model does not have")
        load_whole_into(params[name], tensor)  # this rank's rows of a sharded parameter
    optimizer.load_state_dict(local_optimizer_state(contents["optimizer"], optimizer))
    rng = contents["rng"]
    by_rank = rng.get("torch_by_rank") or [rng["torch"]]
    torch.set_rng_state(by_rank[rank] if rank < len(by_rank) else rng["torch"])
    random.setstate(rng["python"])
    return contents["state"]
