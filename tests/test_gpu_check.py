"""The prepared GPU check (benchmarks/gpu_check.sh) on a machine without CUDA: one line, exit 0.
Its 8B side-by-side script is checked end to end on the CPU with a tiny model (--smoke): the same
code path, both precision-matched pairs, interleaved repeats, every column and the version line;
its dequantisation comparison (gpu_bench.py --only dequant) keeps every shape's figure."""
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


SMOKE_COLUMNS = ["arm", "repeat", "embedding/head dtype", "tokens/s", "max allocated GiB", "max reserved GiB",
                 "device in use GiB", "load s", "step-0 loss", "last loss"]


def _table(text: str, first_column: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the markdown table whose header starts with `first_column`."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_column} |"))
    cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("| "):
            break
        rows.append(cells(ln))
    return cells(lines[start]), rows


@pytest.mark.slow
def test_gpu_qlora_8b_smoke_runs_both_pairs_interleaved(tmp_path):
    """Both sides, two arms each, 3 interleaved repeats, on a tiny random Llama on the CPU. The same
    start gives the same step-0 loss in every arm (qforge's NF4 is bitsandbytes' bit for bit and
    each arm's adapters start at B = 0); each arm's recipe leaves the embedding and head in the
    dtypes it claims; the versions and the budget are printed; the last line carries all four ratios."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_qlora_8b.py"), "--smoke",
                           "--model-dir", str(tmp_path / "model")], capture_output=True, text=True, env=_env(),
                          timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    version = next(ln for ln in out.splitlines() if ln.startswith("versions: "))
    for lib in ("torch ", "CUDA ", "bitsandbytes ", "peft ", "transformers ", "triton "):
        assert lib in version, version
    assert any(ln.startswith("budget: 3 repeats x 2 processes") for ln in out.splitlines())
    header, rows = _table(out, "arm")
    assert header == SMOKE_COLUMNS
    arms = [(r[0], int(r[1])) for r in rows]
    assert arms == [("qforge bf16 residual", 1), ("qforge f32 residual", 1), ("peft no upcast", 1), ("peft recipe", 1),
                    ("peft no upcast", 2), ("peft recipe", 2), ("qforge bf16 residual", 2), ("qforge f32 residual", 2),
                    ("qforge bf16 residual", 3), ("qforge f32 residual", 3), ("peft no upcast", 3), ("peft recipe", 3)]
    dtypes = {r[0]: r[2] for r in rows}
    # the float32 residual keeps a 16-bit checkpoint's embeddings 16-bit (their output is cast to float32)
    assert dtypes == {"qforge bf16 residual": "bfloat16/bfloat16", "qforge f32 residual": "bfloat16/bfloat16",
                      "peft no upcast": "bfloat16/bfloat16", "peft recipe": "float32/float32"}
    step0 = {float(r[8]) for r in rows}
    assert max(step0) - min(step0) < 0.01, step0
    pair_header, pairs = _table(out, "pair")
    assert pair_header[:3] == ["pair", "repeats with both", "speed qforge/peft median (min-max)"]
    assert [p[0] for p in pairs] == ["qforge f32 residual vs peft recipe", "qforge bf16 residual vs peft no upcast"]
    assert all(p[1] == "3" for p in pairs)
    last = out.strip().splitlines()[-1].split()
    assert [kv.split("=")[0] for kv in last] == ["gpu_qlora_speed_vs_peft_recipe", "gpu_qlora_mem_vs_peft_recipe",
                                                 "gpu_qlora_bf16res_speed_vs_peft_noupcast",
                                                 "gpu_qlora_bf16res_mem_vs_peft_noupcast"]
    assert float(last[0].split("=")[1]) > 0 and float(last[2].split("=")[1]) > 0


def test_gpu_qlora_8b_never_writes_the_checkpoint_inside_the_clock(tmp_path):
    """--no-write (what gpu_check.sh passes after its write stage) refuses a missing model, in one line."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_qlora_8b.py"), "--smoke", "--no-write",
                           "--model-dir", str(tmp_path / "none")], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].startswith("no random model in "), proc.stdout + proc.stderr
    assert not (tmp_path / "none").exists()


def test_gpu_bench_dequant_keeps_every_shape():
    """Each weight shape's figure is printed; the headline is the smallest of them."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--only", "dequant"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())
    assert "error_dequant_bench" not in figures, proc.stdout[-3000:]
    shapes = [k.removeprefix("dequant_triton_frac_copy_") for k in figures if k.startswith("dequant_triton_frac_copy_")]
    assert shapes == ["64x96", "32x64"]
    assert float(figures["dequant_triton_frac_copy"]) == min(float(figures[f"dequant_triton_frac_copy_{s}"])
                                                             for s in shapes)
    assert all(f"dequant_triton_speedup_vs_torch_{s}" in figures for s in shapes)
    assert "every path writes into one preallocated output buffer" in proc.stdout
