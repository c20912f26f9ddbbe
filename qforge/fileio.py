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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def atomic_write_bytes(final: Path, data: bytes) -> Path:
    """Write `data` to `final` atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        public_permissions(Path(tmp))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final
