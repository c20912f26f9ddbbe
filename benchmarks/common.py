"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def proc_status(*keys: str) -> dict[str, int]:
    """Fields of this process' /proc/self/status in bytes (Linux): VmRSS (resident now), VmHWM (peak
    resident, reset by exec and by writing 5 to /proc/self/clear_refs), RssAnon (anonymous memory:
    the process' own), RssFile (file pages mapped into it: page cache the kernel can drop).
    A key the kernel does not report raises KeyError naming it."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in keys:
                out[key] = int(line.split()[1]) * 1024
    missing = [k for k in keys if k not in out]
    if missing:
        raise KeyError(f"{', '.join(missing)} not in /proc/self/status")
    return out


def status_bytes(key: str) -> int:
    """One field of /proc/self/status in bytes (see proc_status)."""
    return proc_status(key)[key]


def median_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def quantize_once(dense, bnb) -> None:
    """`qforge quantize dense bnb` (the bitsandbytes-format 4-bit folder both sides of a benchmark
    load) unless bnb already holds a model; a failure ends the benchmark with its stderr."""
    import subprocess
    import sys
    from pathlib import Path

    if (Path(bnb) / "config.json").is_file():
        return
    print(f"qforge quantize {dense} -> {bnb} (once)", flush=True)
    proc = subprocess.run([sys.executable, "-m", "qforge", "quantize", str(dense), str(bnb)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"qforge quantize {dense} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
