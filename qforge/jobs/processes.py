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
