"""Planner calibration: the peak memory that training settings actually take on this machine.

`measure_training_peaks(settings, work_dir)` runs each setting in a fresh process and returns what
it measured; tests/plan/test_plan_measured.py compares the planner (qforge.plan, CPU_BF16) with it.
Run one setting by hand:  python benchmarks/plan_calibration.py SPEC.json OUT.json
(SPEC: measure_training_peak's keyword arguments as JSON).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import status_bytes  # noqa: E402




def _release_memory() -> None:
    import gc

    from qforge.model.load import release_free_memory
    gc.collect()
    release_free_memory()  # glibc keeps freed heap pages resident until malloc_trim


def measure_training_peak(method: str, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                          steps: int = 3, rank: int = 16, model: str = "smollm2", seed: int = 0,
                          keep_base_outputs: bool = False) -> dict:
    """Peak CPU memory of training `method` at one setting, in bytes above an import-only
    baseline. Call it in a fresh process (measure_training_peaks does), once.

    baseline: the RSS after importing torch, transformers, the Llama model code and qforge's
    training modules, before any tensor exists (a bare `import torch, transformers` plus code the
    run imports anyway). Then: load the model for `method` (rank, all-linear), run `steps` steps of
    the train loop's step (autocast forward, backward, gradient clipping, paged 8-bit AdamW, whose
    first step creates its state) on a random batch of batch_size x seq_len tokens, every token a
    target; peak = VmHWM - baseline.
    One setting per process: settings run one after another in one process share a heap, and a
    checkpointed batch-4 setting after an uncheckpointed one read 10-30% high and varied run to
    run (4 x 256 with checkpointing: 1285-1498 MB in sequence, 1227-1299 MB fresh). The peak
    settles after the second step (fresh 4 x 256, checkpointing: 1041, 1117, 1253 MB).
    Returns the setting with peak_bytes, baseline_bytes, loaded_bytes (after loading, above
    baseline) and steps.
    """
    import torch
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    from qforge.train.config import TrainConfig
    from qforge.train.loop import autocast, make_optimizer
    from qforge.train.run import load_for_method
    # Everything the run imports or builds once, before the baseline: qforge's model, layer,
    # quantisation and optimiser modules (compiled from source when no bytecode is cached, which
    # leaves garbage in the heap), the native kernel library, the tokenizer code.
    import qforge.adapters  # noqa: F401
    import qforge.model.load  # noqa: F401
    import qforge.optim  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    from qforge.kernels import dispatch
    dispatch.warm_up(torch.device("cpu"))  # the native kernel library, built or loaded
    _release_memory()
    baseline = status_bytes("VmRSS")
    cfg = TrainConfig(model=model, method=method, rank=rank, alpha=2 * rank, seed=seed, output_dir="/dev/null",
                      batch_size=batch_size, max_seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                      keep_base_outputs=keep_base_outputs, device="cpu")
    torch.manual_seed(seed)
    net, _ = load_for_method(cfg)
    _release_memory()
    loaded = status_bytes("VmRSS") - baseline
    net.train()  # the loaded model is in eval mode, where transformers skips checkpointing
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    ids = torch.randint(0, net.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        with autocast(cfg, torch.device("cpu")):
            loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"method": method, "batch_size": batch_size, "seq_len": seq_len,
            "gradient_checkpointing": gradient_checkpointing, "keep_base_outputs": keep_base_outputs,
            "steps": steps, "rank": rank,
            "peak_bytes": status_bytes("VmHWM") - baseline, "baseline_bytes": baseline, "loaded_bytes": loaded}


# glibc's malloc, by default, serves blocks under a threshold that it raises at run time (up to
# 32 MB) from its heap, and how much freed heap stays resident depends on the order in which the
# OpenMP threads allocate: the peak RSS of one setting varied 1270-1701 MB across fresh processes
# (qlora, 4 x 256, checkpointing). With the threshold fixed at 128 KiB every tensor-sized block
# is its own mapping, returned to the system when freed, and the peak is what the run holds live:
# the same to a few MB every time (845, 845 MB). That is the figure the planner predicts and
# the test compares; it costs the run about twice the time, so it is set for measurements only.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_training_peaks(settings: list[dict], work_dir: str | Path, timeout: float = 600) -> list[dict]:
    """measure_training_peak(**setting) for each setting, each in a fresh process with
    OMP_WAIT_POLICY=PASSIVE (as the bench's children) and MEASURE_ENV; the results in order."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for i, setting in enumerate(settings):
        spec, out = work / f"memory-{i}.json", work / f"memory-{i}-result.json"
        spec.write_text(json.dumps(setting))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
                   HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
                   OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **MEASURE_ENV)
        with open(work / f"memory-{i}.log", "w") as log_file:
            code = subprocess.run([sys.executable, __file__, str(spec), str(out)], stdout=log_file,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        if code != 0 or not out.is_file():
            tail = (work / f"memory-{i}.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"measuring {setting} failed:\n{tail}")
        results.append(json.loads(out.read_text()))
    return results



if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python benchmarks/plan_calibration.py SPEC.json OUT.json", file=sys.stderr)
        sys.exit(2)
    report = measure_training_peak(**json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(report, indent=2))
