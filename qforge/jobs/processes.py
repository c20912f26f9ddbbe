"""Process plumbing shared by the job worker, its trainers and its supervisor (Linux first)."""
from __future__ import annotations

import os
import signal


def die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent exits; exit now if it already has."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker also polls its parent
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group `pid` leads; a group already gone is no error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[int]:
    """Every living process under `pid` (children, theirs, ...), read from /proc; [] where there is none."""
    from pathlib import Path
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL the process group `pid` leads and every process under it, in whatever group or session
    (torchrun starts each rank in a session of its own): nothing of a trainer outlives this."""
    under = descendants(pid)  # read before the kill: orphans are re-parented away from `pid`
    signal_group(pid, signal.SIGKILL)
    for child in under:
        signal_group(child, signal.SIGKILL)  # a rank leads its own group: its helpers go with it
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
