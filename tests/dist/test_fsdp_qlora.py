"""FSDP-QLoRA on the CPU with 2 and 4 processes (gloo), on the embedded model, against a 1-process run.

One 10-step run of each (module fixtures, each a fresh `qforge train` process as a user runs it):
the curves agree to float32 rounding (see the bound's reasoning below); each rank holds 1/N of the
4-bit base, the adapters, their gradients, the 8-bit optimiser state and the embeddings; the
checkpoints are the same files whatever N; a 4-process checkpoint resumes at 2 and at 1 process
on the 4-process curve, a 2-process one in 1 process; a rank that dies ends the run with a clear error.

The runs compute in float32: in bfloat16 the adapters' gradients are rounded once per rank before
the sum (once in all in one process), and Adam's normalisation turns that last-bit difference into
visibly different steps, so bf16 curves agree only in trend.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "qforge" / "data" / "demo_task" / "train.jsonl"
STEPS = 10
ARGS = ["--data", str(DATA), "--max-steps", str(STEPS), "--batch-size", "4", "--max-seq-len", "128",
        "--dropout", "0", "--lr", "1e-3", "--warmup-ratio", "0.1", "--seed", "0", "--compute-dtype", "float32",
        "--optimizer", "paged_adamw_8bit"]

pytestmark = pytest.mark.slow


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**e, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "QFORGE_DIST_TIMEOUT": "30", **extra}


def qforge_train(out: Path, *extra: str, timeout=600, **env_extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qforge", "train", *ARGS, "--output-dir", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    return done


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def max_relative_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    done = qforge_train(out, "--save-every", "5")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    done = qforge_train(out, "--nproc", "2", "--save-every", "5")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout + done.stderr


@pytest.fixture(scope="module")
def quad(tmp_path_factory):
    out = tmp_path_factory.mktemp("quad")
    done = qforge_train(out, "--nproc", "4", "--save-every", "5", timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout + done.stderr


# What float32 rounding allows. The two runs differ only in where sums are split: each rank's forward
# runs on half the rows (other matmul blockings) and the adapters' gradients are summed as two
# partial sums instead of one. Step 1 therefore differs by a rounding or two: measured 8e-8 relative
# in the loss (float32's unit roundoff is 6e-8) and 0 in the gradient norm. Each later step adds
# rounding of the same size to the adapters, and Adam's update m / sqrt(v) is unit-sized whatever a
# gradient's magnitude, so a 1e-7 relative difference in a small gradient component becomes that
# relative difference in its step; as the loss falls (0.64 -> 0.03) the same absolute difference
# (~1e-6) is a larger relative one. Measured on the CPU (2026-12-06): 1.3e-5 at most over the 10
# steps (step 7). The bound, 5e-5, is that with a 4x margin for another CPU's rounding (other SIMD
# widths and BLAS blockings round differently) -- about 800 float32 ulps, while a synchronisation bug
# (a rank's gradients missing from the sum, a rank on other rows or other weights) changes step 2's
# update itself, not its last bits (the first update alone takes the loss from 0.64 to 0.23). Adam is blind to a gradient's scale, so a sum averaged twice or not at
# all would leave the loss curve alone: step 1's gradient norm (before any update) catches that,
# to a few roundings.
LOSS_BOUND = 5e-5
FIRST_GRAD_NORM_BOUND = 1e-6


def grad_norms(out: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_two_processes_follow_the_single_process_curve(single, pair):
    out, _ = pair
    a, b = losses(single), losses(out)
    assert len(a) == STEPS and a[STEPS] < a[1]
    measured = max_relative_difference(a, b)
    print(f"two processes vs one: max relative loss difference over {STEPS} steps = {measured:.3g}")
    assert measured < LOSS_BOUND, (a, b)
    g1, g2 = grad_norms(single)[1], grad_norms(out)[1]
    assert abs(g1 - g2) / g1 < FIRST_GRAD_NORM_BOUND, (g1, g2)


def test_four_processes_follow_the_single_process_curve(single, quad):
    """The same bound: 4 ranks split the rows and the gradient sums four ways instead of two, which
    moves roundings around but adds none of a larger size (the partial sums are float32 either way)."""
    out, _ = quad
    a, b = losses(single), losses(out)
    measured = max_relative_difference(a, b)
    print(f"four processes vs one: max relative loss difference over {STEPS} steps = {measured:.3g}")
    assert measured < LOSS_BOUND, (a, b)
    g1, g4 = grad_norms(single)[1], grad_norms(out)[1]
    assert abs(g1 - g4) / g1 < FIRST_GRAD_NORM_BOUND, (g1, g4)


def test_each_rank_holds_half_of_the_4bit_base(pair):
    out, log = pair
    summary = json.loads((out / "summary.json").read_text())
    whole, by_rank = summary["quantised_bytes"], summary["quantised_bytes_by_rank"]
    assert summary["processes"] == 2 and len(by_rank) == 2
    assert whole > 50e6  # SmolLM2-135M's linear layers in NF4 with double quantisation
    for held in by_rank:
        assert 0.45 <= held / whole <= 0.55, (held, whole)
    assert "rank 1 " in log and "adapters" in log


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_holds_1_over_n_of_every_component(pair, quad, n):
    """Within the last shard's padding: FSDP cuts dim 0 into ceil(rows / N)-row chunks, so a rank
    holds at most one chunk more than 1/N of a tensor's rows (the ones SmolLM2 has: 576, 192, 1536,
    a rank of 16 rows: exact at N = 2 and 4); the 8-bit state adds one absmax per 256 values."""
    out, _ = pair if n == 2 else quad
    summary = json.loads((out / "summary.json").read_text())
    by_rank = summary["held_bytes_by_rank"]
    assert len(by_rank) == n and summary["kept_whole"] == []
    for held in by_rank:
        for key in ("base", "adapters", "gradients", "optimizer", "embeddings"):
            whole = held[key + "_whole"]
            assert whole > 0 and abs(held[key] * n / whole - 1) < 0.02, (key, held[key], whole)
    assert by_rank[0]["embeddings_whole"] > 50e6  # SmolLM2's 49152 x 576 embeddings (tied to the head)


def checkpoint_files(out: Path, step: int) -> dict:
    import torch
    from safetensors.torch import load_file
    folder = out / "checkpoints" / f"step-{step:06d}"
    trainable = {k: tuple(v.shape) for k, v in load_file(folder / "trainable.safetensors").items()}
    peft = {k: tuple(v.shape) for k, v in load_file(folder / "adapter" / "adapter_model.safetensors").items()}
    opt = torch.load(folder / "optimizer.pt", weights_only=False)
    state = {(i, k): tuple(v.shape) if torch.is_tensor(v) else v for i, s in opt["state"].items() for k, v in s.items()}
    return {"trainable": trainable, "peft": peft, "optimizer": state, "groups": len(opt["param_groups"])}


def test_checkpoints_are_the_same_files_whatever_the_number_of_processes(single, pair, quad):
    one = checkpoint_files(single, 5)
    assert one["optimizer"] and any(k == "exp_avg_codes" for _, k in one["optimizer"])
    assert checkpoint_files(pair[0], 5) == one
    assert checkpoint_files(quad[0], 5) == one


@pytest.mark.parametrize("n", [2, 1])
def test_a_four_process_checkpoint_resumes_at_two_and_one_process(quad, tmp_path, n):
    out, _ = quad
    shutil.copytree(out / "checkpoints" / "step-000005", tmp_path / "checkpoints" / "step-000005")
    done = qforge_train(tmp_path, "--resume", *(["--nproc", str(n)] if n > 1 else []))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout
    resumed, reference = losses(tmp_path), losses(out)
    assert sorted(resumed) == list(range(6, STEPS + 1))
    measured = max_relative_difference({s: reference[s] for s in resumed}, resumed)
    print(f"4-process checkpoint resumed at {n}: max relative loss difference = {measured:.3g}")
    assert measured < LOSS_BOUND


def test_only_rank_0_writes(pair):
    out, _ = pair
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "config.yaml", "loss.png",
                                                      "metrics.jsonl", "summary.json"]
    assert len(losses(out)) == STEPS  # one line a step, not one a rank
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000010"]


def test_a_two_process_checkpoint_resumes_in_one_process(single, pair, tmp_path):
    out, _ = pair
    shutil.copytree(out / "checkpoints" / "step-000005", tmp_path / "checkpoints" / "step-000005")
    done = qforge_train(tmp_path, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout
    resumed, reference = losses(tmp_path), losses(single)
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert max_relative_difference({s: reference[s] for s in resumed}, resumed) < 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_stops_torchrun_with_a_clear_error(tmp_path):
    t0 = time.monotonic()
    done = qforge_train(tmp_path, "--nproc", "2", "--max-seq-len", "64", "--batch-size", "2", timeout=300,
                        QFORGE_DIST_FAULT="1:2")
    elapsed = time.monotonic() - t0
    assert done.returncode != 0
    assert elapsed < 120, elapsed
    log = done.stdout + done.stderr
    assert "QFORGE_DIST_FAULT=1:2: exiting abruptly" in log
    assert "the 2-process run failed" in log and "exitcode: 17" in log


def test_without_an_agent_the_survivor_exits_with_a_clear_error(tmp_path):
    """Two ranks started by hand (as on two machines, no torchrun agent to stop the survivor):
    rank 1 vanishes after step 2; rank 0 must stop with its own message, not hang."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "qforge.train", *ARGS, "--output-dir", str(tmp_path), "--max-seq-len", "64",
           "--batch-size", "2"]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port, QFORGE_DIST_FAULT="1:2"))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    assert procs[1].returncode == 17
    assert procs[0].returncode == 4, outs[0][-3000:]
    assert "rank 0 of 2: lost contact with another rank" in outs[0]
    assert elapsed < 120, elapsed
