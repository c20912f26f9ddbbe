"""Planner calibration: the CPU memory model fitted on one set of settings, checked on others.

  python benchmarks/plan_calibration.py [--sets fit,heldout] [--residual bfloat16,float32] [--long 2048,4096]
                                       [--work DIR]

runs every setting of the chosen sets in a fresh process (measure_training_peak), once per residual
dtype (TrainConfig.residual_dtype: float32, qlora's and lora's default since issue 27, and bfloat16,
the stream the constants were fitted on), prints a block per dtype with one row per setting (set,
model, method, batch x seq, checkpointing, loss, measured MB, planned MB, error) and its summary:
`bfloat16_residual: fit_err_max=X heldout_err_max=Y` for the BF16 block, and last, for the default,
`fit_err_max=X heldout_err_max=Y` (the largest |planned / measured - 1| of each set).

FIT: the ten settings the CPU constants (qforge.plan.CPU_BF16) were fitted to: SmolLM2-135M, rank 16,
qlora and lora at 1 x 128 and 4 x 256 with (full or selective) checkpointing, 1 x 256 and 4 x 128
without, transformers' one-pass loss (`model(...).loss`), as tests/plan/test_plan_measured.py runs them.
(CPU_BF16.sdpa_layer_scale was fitted on a third set, benchmarks/long_context.py's 13M Llama shape.)
All of them with the BF16 residual stream; the float32 residual adds no fitted constant (qforge.plan.memory's
float32_residual_layer_bytes, float32_residual_score_bytes and a tied head's copy are counts of the
tensors the code saves), so its FIT rows test those counts and its HELD-OUT rows the whole model.
HELD-OUT: settings none of the constants saw, all with the trainer's loss (qforge.train.loss's
causal_lm_loss: chunked above one chunk of rows): SmolLM2 at other batches and lengths (2 x 512,
8 x 64 without checkpointing, lora 1 x 1024), the long-context rows (SmolLM2 at 1 x 2048, 1 x 4096,
...: --long), a random model of TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632,
32 heads / 4 kv, vocab 32000, untied) and a random Gemma-2-style model (tied 256000-token embeddings,
four norms per layer, soft-capped logits; hidden 256, 4 layers), both written as bf16 safetensors
into the work folder, tensor by tensor.

Measured: the peak resident memory over training steps 2 and 3 (VmHWM reset after step 1), above the
process' RSS after its imports, with glibc's mmap threshold fixed (MEASURE_ENV): the memory the run
holds live, which does not depend on machine load. The planned figure is qforge.plan.plan_run's total
with CPU_BF16 (one process; the per-rank figure of an N-process run is qforge.plan.per_rank, which
benchmarks/scale.py checks against each rank's measured peak: predict_per_rank below is its hook).

One setting by hand:  python benchmarks/plan_calibration.py --one SPEC.json OUT.json
(SPEC: measure_training_peak's keyword arguments as JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import status_bytes  # noqa: E402




def _release_memory() -> None:
    import gc

    from qforge.model.load import release_free_memory
    gc.collect()
    release_free_memory()  # glibc keeps freed heap pages resident until malloc_trim


def reset_peak() -> None:
    """Reset this process' VmHWM to its current RSS (Linux: 5 into /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_training_peak(method: str, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                          steps: int = 3, rank: int = 16, model: str = "smollm2", seed: int = 0,
                          keep_base_outputs: bool = False, loss: str = "model",
                          residual_dtype: str = "float32") -> dict:
    """Peak CPU memory of training `method` at one setting, in bytes above an import-only
    baseline. Call it in a fresh process (measure_training_peaks does), once.

    baseline: the RSS after importing torch, transformers, the Llama model code and qforge's
    training modules, before any tensor exists (a bare `import torch, transformers` plus code the
    run imports anyway). Then: load the model for `method` (rank, all-linear), run `steps` steps of
    the train loop's step (autocast forward, backward, gradient clipping, paged 8-bit AdamW, whose
    first step creates its state) on a random batch of batch_size x seq_len tokens, every token a
    target; peak = VmHWM - baseline, VmHWM reset after the first step (writing 5 to
    /proc/self/clear_refs), so that the peak is the steady training step's (steps >= 2), not the load's.
    loss "model": transformers' one-pass loss (`model(...).loss`, what the FIT set ran); "trainer":
    qforge's causal_lm_loss, chunked above one chunk of rows, as `qforge train` runs it.
    residual_dtype: TrainConfig.residual_dtype ("float32", the default of qlora and lora since issue 27,
    or "bfloat16", the residual stream the planner was first fitted on).
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
    if Path(model).is_dir():  # a random held-out model: its modelling code is imported before the baseline too
        import importlib
        kind = json.loads((Path(model) / "config.json").read_text())["model_type"]
        importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")

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
                      keep_base_outputs=keep_base_outputs, device="cpu", residual_dtype=residual_dtype)
    torch.manual_seed(seed)
    net, _ = load_for_method(cfg)
    _release_memory()
    loaded = status_bytes("VmRSS") - baseline
    net.train()  # the loaded model is in eval mode, where transformers skips checkpointing
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    ids = torch.randint(0, net.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    from qforge.train.loss import causal_lm_loss
    for step in range(steps):
        with autocast(cfg, torch.device("cpu")):
            if loss == "trainer":
                value = causal_lm_loss(net, {"input_ids": ids, "labels": ids})
            else:
                value = net(input_ids=ids, labels=ids, use_cache=False).loss
        value.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0 and steps > 1:
            del value
            _release_memory()
            reset_peak()
    return {"method": method, "batch_size": batch_size, "seq_len": seq_len, "model": model, "loss": loss,
            "gradient_checkpointing": gradient_checkpointing, "keep_base_outputs": keep_base_outputs,
            "steps": steps, "rank": rank, "residual_dtype": residual_dtype,
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
    OMP_WAIT_POLICY=PASSIVE (as the bench's children) and MEASURE_ENV; the results in order. A result
    already in work_dir for the same setting is read back, not measured again (a rerun resumes)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for i, setting in enumerate(settings):
        spec, out = work / f"memory-{i}.json", work / f"memory-{i}-result.json"
        if out.is_file() and spec.is_file() and json.loads(spec.read_text()) == setting:
            results.append(json.loads(out.read_text()))
            continue
        spec.write_text(json.dumps(setting))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
                   HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
                   OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **MEASURE_ENV)
        with open(work / f"memory-{i}.log", "w") as log_file:
            code = subprocess.run([sys.executable, __file__, "--one", str(spec), str(out)], stdout=log_file,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        if code != 0 or not out.is_file():
            tail = (work / f"memory-{i}.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"measuring {setting} failed:\n{tail}")
        results.append(json.loads(out.read_text()))
    return results



def measure_loss_bytes_per_logit(vocab: int = 49152, hidden: int = 576, rows: int = 1024) -> dict:
    """Bytes per logit of one chunk at the peak of qforge's chunked loss alone (its forward, which
    takes the gradients too), plain and soft-capped (cap 30, Gemma 2's), at SmolLM2's vocabulary and
    hidden size: what CPU_BF16.chunk_logit_bytes and softcap_logit_bytes are set from. Call it in a
    fresh process with MEASURE_ENV (loss_probe does)."""
    import torch

    from qforge.train.loss import chunk_rows_for, chunked_cross_entropy
    weight = (torch.randn(vocab, hidden) * 0.02).bfloat16()
    h, y, chunk = torch.randn(rows, hidden, requires_grad=True), torch.randint(0, vocab, (rows,)), chunk_rows_for(vocab)
    out = {}
    for name, cap in (("plain", None), ("softcap", 30.0)):
        _release_memory()
        reset_peak()
        start = status_bytes("VmRSS")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(h, weight, None, y, chunk, 1.0, cap)
        out[name] = (status_bytes("VmHWM") - start) / (chunk * vocab)
        del loss
    return out


def loss_probe() -> dict:
    """measure_loss_bytes_per_logit in a fresh process with MEASURE_ENV."""
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **MEASURE_ENV)
    out = subprocess.run([sys.executable, __file__, "--loss-probe"], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the loss probe failed:\n{out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the random held-out models

TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                 max_position_embeddings=2048, rms_norm_eps=1e-5)
GEMMA2 = dict(model_type="gemma2", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, vocab_size=256000, tie_word_embeddings=True,
              max_position_embeddings=8192)


def write_random_model(folder: Path, config: dict, seed: int = 0) -> Path:
    """A random bf16 model of `config` (a transformers config as a dict with model_type) saved into
    `folder` as safetensors, one file per decoder layer (and one for the rest), written tensor by
    tensor: the parent never holds the whole model. SmolLM2's tokenizer beside it (the runs feed
    random token ids below the model's vocabulary, so its size does not matter). The folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qforge.model.checkpoint import save_tokenizer
    from qforge.model.embedded import smollm2_gguf_path
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.for_model(**config)
    cfg.torch_dtype = "bfloat16"
    with torch.device("meta"):  # names and shapes only
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    files: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        layer = int(parts[2]) + 1 if parts[:2] == ["model", "layers"] else 0
        files.setdefault(f"model-{layer:05d}.safetensors", []).append(name)
    gen, weight_map, total = torch.Generator().manual_seed(seed), {}, 0
    for file, names in files.items():
        tensors = {n: (torch.randn(shapes[n], generator=gen) * (0.02 if len(shapes[n]) > 1 else 1.0)).bfloat16()
                   for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        total += sum(t.numel() * 2 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(str(folder))
    from transformers import AutoTokenizer
    gguf = smollm2_gguf_path()
    save_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), folder)
    return folder


# ---------------------------------------------------------------- the two sets of settings

RANK = 16
FIT = [{"method": m, "batch_size": b, "seq_len": s, "gradient_checkpointing": gc, "keep_base_outputs": keep,
        "model": "smollm2", "loss": "model"}
       for m in ("qlora", "lora")
       for b, s, gc, keep in ((1, 128, True, True), (1, 256, False, False), (4, 128, False, False),
                              (4, 256, True, True), (4, 256, True, False))]


def heldout_settings(tinyllama: str, gemma: str, long_lengths: list[int]) -> list[dict]:
    """The HELD-OUT settings (see the module docstring); `tinyllama` and `gemma` are model folders."""
    def row(model, method, batch, seq, gc=True):
        return {"method": method, "batch_size": batch, "seq_len": seq, "gradient_checkpointing": gc,
                "keep_base_outputs": False, "model": model, "loss": "trainer"}
    rows = [row(gemma, "qlora", 2, 256), row(gemma, "qlora", 1, 512, gc=False),
            row("smollm2", "qlora", 8, 64, gc=False), row(tinyllama, "qlora", 1, 256),
            row("smollm2", "qlora", 2, 512)]
    long_rows = [dict(row("smollm2", "qlora", 1, n), steps=2) for n in long_lengths]  # the peak of step 2
    return rows + long_rows + [row("smollm2", "lora", 1, 1024), row(tinyllama, "qlora", 2, 256, gc=False)]


def planned_total(setting: dict) -> int:
    """The planner's bytes for one measured setting: plan_run's total with the CPU constants."""
    from qforge.plan import CPU_BF16, load_arch, plan_run
    return plan_run(load_arch(setting["model"]), setting["method"], seq_len=setting["seq_len"],
                    batch_size=setting["batch_size"], rank=setting.get("rank", RANK),
                    gradient_checkpointing=setting["gradient_checkpointing"],
                    keep_base_outputs=setting["keep_base_outputs"], constants=CPU_BF16,
                    chunked_loss=setting.get("loss") == "trainer",
                    residual_bytes=residual_bytes(setting)).total


def residual_bytes(setting: dict) -> int:
    """plan_run's residual_bytes for a setting: 4 for the float32 residual stream (a missing
    residual_dtype is measure_training_peak's default, float32), 2 for bfloat16."""
    return 4 if setting.get("residual_dtype", "float32") == "float32" else 2


def predict_per_rank(setting: dict, world: int) -> dict:
    """The hook benchmarks/scale.py compares each rank's measured peak with: qforge.plan.per_rank for
    one setting (as above) run over `world` processes, CPU constants; bytes by component."""
    from qforge.plan import CPU_BF16, load_arch, per_rank
    return per_rank(load_arch(setting["model"]), setting["method"], world=world, seq_len=setting["seq_len"],
                    batch_size=setting["batch_size"], rank=setting.get("rank", RANK),
                    gradient_checkpointing=setting["gradient_checkpointing"],
                    keep_base_outputs=setting["keep_base_outputs"], constants=CPU_BF16,
                    chunked_loss=setting.get("loss") == "trainer", residual_bytes=residual_bytes(setting))


def report_row(label: str, result: dict) -> tuple[str, float]:
    """One printed row and its relative error (planned / measured - 1)."""
    plan, peak = planned_total(result), result["peak_bytes"]
    error = plan / peak - 1
    mode = ("selective" if result["keep_base_outputs"] else "full") if result["gradient_checkpointing"] else "off"
    model = Path(result["model"]).name if "/" in result["model"] else result["model"]
    return (f"{label:8} {model:22} {result['method']:5} {result['batch_size']:>2} x {result['seq_len']:<5} "
            f"{mode:9} {result['loss']:7} {peak / 1e6:8.0f} {plan / 1e6:8.0f} {error:+7.1%}"), error


RESIDUALS = ("bfloat16", "float32")  # printed in this order: the default's (float32) summary is the last line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the CPU peak of training settings and compare the "
                                                 "planner with it, on its FIT set and on a HELD-OUT set.")
    parser.add_argument("--sets", default="fit,heldout", help="comma-separated: fit, heldout (default both)")
    parser.add_argument("--residual", default="bfloat16,float32",
                        help="comma-separated residual dtypes to measure, a block each: bfloat16, float32 "
                             "(default both; float32, qlora's and lora's default, is printed last)")
    parser.add_argument("--long", default="2048,4096",
                        help="comma-separated sequence lengths of the long-context held-out rows (SmolLM2, "
                             "batch 1); empty for none")
    parser.add_argument("--measured-only", action="store_true",
                        help="measure nothing: print the rows whose results --work holds already")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one setting may take (default 3600)")
    parser.add_argument("--work", default=None, help="folder for the random models and per-setting logs and "
                                                     "results; a rerun with the same folder reads back the settings "
                                                     "measured already (default: a temporary folder)")
    args = parser.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not set(sets) <= {"fit", "heldout"}:
        parser.error(f"--sets: expected fit and/or heldout, got {args.sets!r}")
    residuals = [r.strip() for r in args.residual.split(",") if r.strip()]
    if not residuals or not set(residuals) <= set(RESIDUALS):
        parser.error(f"--residual: expected bfloat16 and/or float32, got {args.residual!r}")
    try:
        long_lengths = [int(n) for n in args.long.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--long: expected comma-separated whole numbers, got {args.long!r}")
    work = Path(args.work or tempfile.mkdtemp(prefix="plan-calibration-"))
    chosen = [("fit", i, s) for i, s in enumerate(FIT)] if "fit" in sets else []
    if "heldout" in sets:
        tiny = write_random_model(work / "tinyllama-1.1b-random", TINYLLAMA)
        gemma = write_random_model(work / "gemma2-tied-random", GEMMA2)
        chosen += [("heldout", i, s) for i, s in enumerate(heldout_settings(str(tiny), str(gemma), long_lengths))]
    if "fit" in sets:
        from qforge.plan import CPU_BF16
        probe = loss_probe()
        print(f"the chunked loss alone (49152 x 576): {probe['plain']:.1f} bytes a logit, "
              f"{probe['softcap']:.1f} soft-capped (CPU_BF16: {CPU_BF16.chunk_logit_bytes}, "
              f"{CPU_BF16.chunk_logit_bytes + CPU_BF16.softcap_logit_bytes})", flush=True)
    for residual in [r for r in RESIDUALS if r in residuals]:
        print(f"\nresidual stream {residual}" + (" (qlora's and lora's default)" if residual == "float32" else ""))
        print(f"{'set':8} {'model':22} {'meth':5} {'batch x seq':10} {'ckpt':9} {'loss':7} {'meas MB':>8} "
              f"{'plan MB':>8} {'error':>7}", flush=True)
        errors: dict[str, list[float]] = {"fit": [], "heldout": []}
        for label, i, setting in chosen:  # results in WORK/<set>-<index in its set>[-bfloat16]
            spec = dict({"steps": 3}, **setting, rank=RANK, residual_dtype=residual)
            folder = work / (f"{label}-{i}" + ("" if residual == "float32" else f"-{residual}"))
            spec_file, out = folder / "memory-0.json", folder / "memory-0-result.json"
            if args.measured_only and not (out.is_file() and json.loads(spec_file.read_text()) == spec):
                print(f"{label:8} {Path(spec['model']).name:22} {spec['method']:5} {spec['batch_size']:>2} x "
                      f"{spec['seq_len']:<5} not measured (--measured-only)", flush=True)
                continue
            result = measure_training_peaks([spec], folder, args.timeout)[0]
            line, error = report_row(label, result)
            errors[label].append(abs(error))
            print(line, flush=True)
        worst = {k: (f"{max(v):.3f}" if v else "nan") for k, v in errors.items()}
        prefix = "" if residual == "float32" else "bfloat16_residual: "
        print(f"{prefix}fit_err_max={worst['fit']} heldout_err_max={worst['heldout']}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--loss-probe"]:
        print(json.dumps(measure_loss_bytes_per_logit()))
        sys.exit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        report = measure_training_peak(**json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(report, indent=2))
        sys.exit(0)
    sys.exit(main())
