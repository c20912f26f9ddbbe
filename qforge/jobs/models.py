"""The fine-tuned models' side of OpenAI's model lifecycle: checkpoint models, deletion, and the
`metadata` filter of the jobs list.

  ft:<base>:<suffix>:<job id>                 the job's final adapter (run/adapter/)
  ft:<base>:<suffix>:<job id>:ckpt-step-<N>   checkpoint N's adapter (run/checkpoints/step-N/adapter/,
                                              written by every training checkpoint)

Deleting a model removes its adapter files and unloads it; the job, its events and its other
checkpoints stay (as OpenAI keeps the job of a deleted model). Only the job's owner may see or
delete its models; to anyone else they do not exist (404).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from .store import JobStore, fine_tuned_model_name

# one canonical name per checkpoint: no leading zeros (ckpt-step-000004 is no alias of ckpt-step-4)
CHECKPOINT_SUFFIX = re.compile(r"^(?P<model>ft:.+):ckpt-step-(?P<step>0|[1-9][0-9]{0,8})$")
METADATA_PARAM = re.compile(r"^metadata\[(?P<key>[^\]]{1,64})\]$")


def checkpoint_of(name: str) -> tuple[str, int] | None:
    """(fine-tuned model name, step) of a checkpoint model name; None for any other name."""
    m = CHECKPOINT_SUFFIX.match(name)
    return (m["model"], int(m["step"])) if m else None


def job_of_model(store: JobStore, name: str) -> dict | None:
    """The job behind a fine-tuned model or one of its checkpoint models; None when there is none."""
    ckpt = checkpoint_of(name)
    if ckpt is None:
        return store.job_for_model(name)
    model, _ = ckpt
    job = store.get_job(model.rsplit(":", 1)[-1])
    if job is None or fine_tuned_model_name(job["model"], job["suffix"], job["id"]) != model:
        return None
    return job


def adapter_dir(store: JobStore, job: dict, name: str) -> Path | None:
    """The PEFT folder that serves model `name` of `job` (None: no such checkpoint)."""
    ckpt = checkpoint_of(name)
    if ckpt is None:
        return store.job_dir(job["id"]) / "run" / "adapter"
    rows = [r for r in store.list_checkpoints(job["id"], limit=10 ** 6)[0] if r["step"] == ckpt[1]]
    return store.root / rows[0]["path"] / "adapter" if rows else None


def model_folder(store: JobStore, job: dict, name: str) -> tuple[Path | None, bool]:
    """(the folder that serves model `name` of `job`, whether it is a whole model): a full
    fine-tune's run/model (Run.save writes it for method full only), else the adapter of the
    job or of its checkpoint. Read off the files: the watcher's job rows carry no method."""
    whole = store.job_dir(job["id"]) / "run" / "model"
    if name == job["fine_tuned_model"] and (whole / "config.json").is_file():
        return whole, True
    return adapter_dir(store, job, name), False


def deleted_key(name: str) -> str:
    """The key of the job event that records model `name`'s deletion (so a restarted server knows)."""
    return f"model-deleted:{name}"


def delete_adapter_files(folder: Path | None) -> bool:
    """Remove a model's adapter folder; False when there was none. The folder is renamed first, so
    a crash part-way leaves no half folder that a server would try to load."""
    if folder is None or not folder.is_dir():
        return False
    doomed = folder.with_name(f".deleted-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def metadata_filter(query_params) -> dict[str, str]:
    """OpenAI's `metadata[key]=value` query parameters as {key: value}."""
    return {m["key"]: v for k, v in query_params.items() if (m := METADATA_PARAM.match(k))}


def matches_metadata(job: dict, wanted: dict[str, str]) -> bool:
    have = job.get("metadata") or {}
    return all(have.get(k) == v for k, v in wanted.items())
