"""Hugging Face Hub model ids (ORG/NAME) to local folders, the way transformers finds them.

The Hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) is looked in first:
models--ORG--NAME/refs/<revision> names a commit and snapshots/<commit>/ holds its files. A model
found there with its weights is used as it is; otherwise, unless HF_HUB_OFFLINE is set, the
snapshot is downloaded through huggingface_hub (with its progress bar) into that same cache.
Only what qforge reads is fetched: config, safetensors weights, tokenizer and template files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
WANTED = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def looks_like_hub_id(source) -> bool:
    """ORG/NAME that is not a path on this machine."""
    return (isinstance(source, str) and bool(HUB_ID.match(source)) and not source.lower().endswith(".gguf")
            and not Path(source).expanduser().exists())


def hub_cache_dir() -> Path:
    """The Hub cache folder, read from the environment at call time (as huggingface_hub does at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHTS)


def resolve_model_id(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of Hub model `repo_id` at `revision` (default: main).

    Errors are one line each: FileNotFoundError for a model missing from the cache while offline,
    or unknown on the Hub; ValueError for a gated model or an unknown revision.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache = hub_cache_dir()
    at = f" at revision '{revision}'" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
        if _has_weights(folder) or offline():
            return folder
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        if offline():
            raise FileNotFoundError(f"model '{repo_id}'{at} is not in the Hugging Face cache ({cache}) and "
                                    "HF_HUB_OFFLINE=1 forbids downloading it") from None
        del exc
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=WANTED))
    except GatedRepoError:
        raise ValueError(f"model '{repo_id}' is gated: accept its terms on https://huggingface.co/{repo_id} "
                         "and log in (`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"model '{repo_id}' has no revision '{revision}' on the Hub") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model '{repo_id}' not found: no such folder here and no such model on the "
                                "Hugging Face Hub (a private model needs `hf auth login` or HF_TOKEN)") from None
    except LocalEntryNotFoundError as exc:  # no connection
        raise FileNotFoundError(f"model '{repo_id}'{at} is not in the Hugging Face cache ({cache}) and the Hub "
                                f"cannot be reached: {str(exc).splitlines()[0]}") from None
