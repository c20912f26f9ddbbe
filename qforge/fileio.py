"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Write to a temporary name beside the target, fsync the data, rename over the target, fsync the
parent folder. Used for checkpoints, adapters, quantised and merged models, and job state.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for f in Path(path).rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def public_permissions(root: Path) -> None:
    """Give `root` and everything under it the permissions a plain write would (umask applied),
    not the private ones of mkdtemp / mkstemp."""
    umask = os.umask(0o22)
    os.umask(umask)
    for path in [root, *Path(root).rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_folder(final: Path, write, markers: tuple[str, ...] | None = None) -> Path:
    """Call write(tmp) on an empty temporary sibling of `final`, fsync what it wrote, then rename it
    to `final`. A reader sees the old folder or the new one, never a half-written one.

    An existing `final` is replaced as a whole (no stale files survive). With `markers`, it is
    replaced only if it is empty or holds one of them: a folder qforge did not write is never deleted.
    """
    out = Path(final).absolute()
    if markers is not None and out.exists() and (
            not out.is_dir() or (any(out.iterdir()) and not any((out / m).exists() for m in markers))):
        raise ValueError(f"refusing to replace '{out}': it exists and does not look like a folder qforge wrote "
                         f"(none of {list(markers)} in it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        public_permissions(tmp)
        fsync_tree(tmp)
        fsync_dir(tmp)
        old = None
        if out.exists():  # two renames: the old folder leaves, the new one arrives
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        full = is_disk_full(exc, out.parent)  # asked before the half-written folder frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(exc, DiskFull):
            raise DiskFull(out, str(exc).splitlines()[0][:120]) from exc
        raise
    return out


def atomic_write_bytes(final: Path, data: bytes) -> Path:
    """Write `data` to `final` atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        public_permissions(Path(tmp))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        if is_disk_full(exc, final.parent) and not isinstance(exc, DiskFull):
            raise DiskFull(final) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


# ---- reading what we wrote: one loader, one error -------------------------------------------------
class CorruptFile(ValueError):
    """A file qforge wrote (an adapter, a checkpoint, a state file) cannot be read back: truncated,
    overwritten or not what its name says. The message names the file; `path` is it."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"'{path}' is {problem}: the file is corrupt or truncated")
        self.path = str(path)


class DiskFull(OSError):
    """No space left on the device while writing `path`."""

    def __init__(self, path: Path | str, detail: str = ""):
        import errno
        super().__init__(errno.ENOSPC, f"no space left on the device while writing '{path}'"
                         + (f" ({detail})" if detail else "") + "; free some space and try again")
        self.path = str(path)


# What libraries that hide the errno say when a write runs out of space: safetensors (Rust's io
# error, "No space left on device (os error 28)"), torch's zip writer ("enforce fail at
# inline_container.cc ... file write failed"), SQLite (SQLITE_FULL) and PostgreSQL (disk_full).
_FULL_TEXTS = ("no space left on device", "(os error 28)", "database or disk is full", "disk quota exceeded")
# torch.save through a C++ stream says only this, whatever went wrong: disk-full only when it is
_IOSTREAM_TEXT = "basic_ios::clear: iostream error"
LOW_SPACE_BYTES = 16 * 2 ** 20


def free_bytes(path: Path | str) -> int | None:
    """Bytes the caller can still write on the file system holding `path` (root may use the
    reserved blocks); None when it cannot be asked."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)


def is_disk_full(exc: BaseException | None, path: Path | str | None = None) -> bool:
    """Whether `exc`, or any exception in its chain (raised from or during it), is the device
    running out of space: OSError ENOSPC/EDQUOT, safetensors' SafetensorError "... (os error 28)",
    torch's zip writer's RuntimeError, SQLite's SQLITE_FULL, PostgreSQL's disk_full (SQLSTATE 53100).
    torch's bare "basic_ios::clear: iostream error" counts only when the file system holding `path`
    (the folder being written) has under LOW_SPACE_BYTES free."""
    import errno
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if any(t in text for t in _FULL_TEXTS):
            return True
        if "inline_container" in text and ("write" in text or "enforce fail" in text):
            return True
        if getattr(exc, "sqlite_errorcode", None) == 13 or getattr(exc, "sqlstate", None) == "53100":
            return True  # SQLITE_FULL; PostgreSQL's disk_full
        if _IOSTREAM_TEXT in text and path is not None:
            free = free_bytes(path)
            if free is not None and free < LOW_SPACE_BYTES:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def read_json(path: Path | str):
    """A JSON file qforge wrote; FileNotFoundError when absent, CorruptFile when unreadable."""
    import json
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CorruptFile(path, f"not valid JSON ({_short(exc)})") from exc


def read_safetensors(path: Path | str) -> dict:
    """Every tensor of a safetensors file; FileNotFoundError when absent, CorruptFile when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CorruptFile(path, f"not a readable safetensors file ({_short(exc)})") from exc


def read_torch(path: Path | str):
    """A torch.save file qforge wrote (optimizer state, generators); CorruptFile when unreadable."""
    import pickle
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing")
    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError, AttributeError, KeyError) as exc:
        raise CorruptFile(path, f"not a readable torch file ({_short(exc)})") from exc


TEMP_SUFFIXES = (".tmp", ".old")


def clean_temporaries(root: Path | str, max_depth: int = 4) -> list[Path]:
    """Remove what an interrupted atomic write left under `root`: files and folders named
    '.<name>.<random>.tmp' / '.old' (atomic_folder, atomic_write_bytes, checkpoint writes). Call it
    only when no write is in flight (start-up). Returns what was removed."""
    removed: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed

    def walk(folder: Path, depth: int) -> None:
        try:
            children = list(folder.iterdir())
        except OSError:
            return
        for child in children:
            if child.name.startswith(".") and child.name.endswith(TEMP_SUFFIXES) and not child.is_symlink():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                removed.append(child)
            elif child.is_dir() and not child.is_symlink() and depth < max_depth:
                walk(child, depth + 1)

    walk(root, 0)
    return removed
