"""The prepared GPU check (benchmarks/gpu_check.sh) on a machine without CUDA: one line, exit 0.
Its 8B side-by-side script is checked end to end on the CPU with a tiny model (--smoke)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}


@no_cuda
def test_gpu_check_without_cuda_says_so_in_one_line():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA"), proc.stdout
    assert proc.stderr == ""


@no_cuda
def test_gpu_qlora_8b_without_cuda_says_so():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_qlora_8b.py")], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "no CUDA device", proc.stdout + proc.stderr


@pytest.mark.slow
def test_gpu_qlora_8b_smoke_runs_both_sides(tmp_path):
    """Both sides train the same tiny random Llama on the CPU; the same start gives the same
    step-0 loss (qforge's NF4 is bitsandbytes' bit for bit), and the last line carries the ratios."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_qlora_8b.py"), "--smoke",
                           "--model-dir", str(tmp_path / "model")], capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_qlora_speed_vs_peft=") and " gpu_qlora_mem_vs_peft=" in last
    rows = {ln.split("|")[1].strip(): ln.split("|") for ln in proc.stdout.splitlines() if ln.startswith("| ")}
    assert set(rows) >= {"qforge", "peft"}
    assert abs(float(rows["qforge"][6]) - float(rows["peft"][6])) < 0.01  # step-0 loss
