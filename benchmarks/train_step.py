"""Training-step speed and memory: qforge QLoRA against bitsandbytes + PEFT QLoRA, like for like.

    .venv/bin/python benchmarks/train_step.py [--workloads short] [--configs ...] [--processes 5]
        [--steps 10] [--warmup 2] [--peer-attention auto] [--quality-json PATH] [--output-dir runs/train_step]
    .venv/bin/python benchmarks/train_step.py --report-only --output-dir runs/train_step [--quality-json PATH]

Every configuration trains LoRA r=16 / alpha 32 on every linear layer but the LM head (dropout
0.05) over a frozen NF4 + double-quant base (bf16 compute, bf16 autocast), with an 8-bit AdamW at
a constant lr 1e-4, on the same batches in the same order. Both sides load the SAME
bitsandbytes-format folder, written once by `qforge quantize` under OUTPUT_DIR/cache (qforge reads
it as stored; transformers + bitsandbytes' CPU backend loads it with from_pretrained). BF16 LoRA
loads the unquantised model.

Configurations (--configs). "upcast" is prepare_model_for_kbit_training's float32 upcast of every
non-4-bit weight (embeddings, norms, the tied head): the peer's float32 residual stream, the
precision of qforge's default; without it every non-4-bit weight stays bf16 (qforge-bf16res's).
  peft-recipe                 PEFT's documented QLoRA recipe: prepare_model_for_kbit_training (the
                              upcast, full non-reentrant checkpointing), transformers' default
                              attention (SDPA), the loss from `model(**batch).loss` (the LM head and
                              float32 logits at every position)
  peft-ckpt-label[-upcast]    PEFT at its best with full checkpointing: full non-reentrant gradient
                              checkpointing, the peer's attention (--peer-attention), and the loss
                              only where a label is, in the peer's own terms: the decoder stack's
                              hidden states, the positions whose next token has a label gathered,
                              the LM head on those only, float32 token-mean cross-entropy (what
                              transformers' `logits_to_keep` with a tensor of positions does, per
                              row); -upcast: the recipe's precision
  peft-matched-nockpt[-upcast]   PEFT without checkpointing, the peer's attention, the loss only
                              where a label is (qforge.train.loss.causal_lm_loss, which works on any
                              transformers model); -upcast: the recipe's precision
  qforge                      qforge's defaults, as `qforge train` runs (residual_dtype auto: float32
                              residual stream for QLoRA, PEFT's recipe's precision; keep_base_outputs
                              auto: selective checkpointing that keeps each 4-bit base product when
                              the plan fits; qforge's attention). qforge-f32res is accepted as its
                              old name.
  qforge-bf16res              qforge with --residual-dtype bfloat16 (the default before it was float32)
  qforge-recompute            qforge with full recomputation (--no-keep-base-outputs)
  qforge-nockpt               qforge without gradient checkpointing
  qforge-lora                 qforge BF16 LoRA (the unquantised bf16 base), its defaults

torch's selective activation checkpointing on the peer (keep every mm/addmm output, recompute the
rest; the rows peft-matched-sac* of earlier runs) is no longer run: its policy sees bitsandbytes'
dequantise as ordinary ops and recomputes it in backward, so it charged the peer work its own
checkpointing would not do; full checkpointing and none bracket it.

The peer's attention (--peer-attention, default auto): a probe runs peft-matched-nockpt (the
fastest PEFT row in every recorded run) with eager and with SDPA attention, 2 fresh processes each,
interleaved, 1 warm-up + --probe-steps timed steps, prints their tokens/s and takes the faster per
workload for every PEFT row but the recipe (which keeps transformers' default, SDPA, as documented);
eager or sdpa forces the choice. Probe records go to OUTPUT_DIR/probe/WORKLOAD/ATTENTION/I.json.

Workloads (--workloads):
  short      SmolLM2-135M (the embedded model), the demo task's rows (~80 tokens), batch 4
  rows512    SmolLM2-135M, rows of 512 tokens (demo rows concatenated, labels on their answers), batch 2
  rows1024   the same at 1024 tokens, batch 1
  tinyllama  a randomly initialised TinyLlama-1.1B-shaped Llama (hidden 2048, 22 layers, vocab
             32000; written once as bf16 safetensors under OUTPUT_DIR/cache, then quantised), rows
             of --tinyllama-seq tokens (the concatenated demo rows' ids modulo 32000), batch 1

Each configuration runs in --processes fresh processes, interleaved: process i of every
configuration runs before process i+1 of any. A process loads, runs --warmup steps (not timed),
returns the allocator's free memory to the system (malloc_trim, both sides), resets the kernel's
high-water mark of its resident set (writing 5 to /proc/self/clear_refs), then times --steps
steps. Speed: each process' tokens per second over its timed steps (the same steps, the same
tokens, for every configuration); a configuration's figure is the median over its processes, with
the spread (min-max). Memory, every row, both sides, one column each: the training phase's peak RSS
(VmHWM over the timed steps; the model, optimiser state and import baseline are in it, the loader's
transient peak is not) and the peak of RssAnon over the same steps (anonymous memory, read every
10 ms by a thread); then RssFile at the end (file pages mapped into the process: transformers maps
the safetensors file, and the 4-bit weights it keeps as views of that mapping are counted here, not
in RssAnon; qforge reads with pread, so its weights are anonymous) and the loading peak. Every
record is written to OUTPUT_DIR/runs/WORKLOAD/CONFIG/I.json, so a run can be made in parts and
reported at once (--report-only).

Each configuration prints its trainable-parameter count, tokens per step, checkpointing policy,
attention, adapter dtype (of the parameters the optimiser updates, read from the trained model)
and residual dtype (the hidden states a decoder layer returns, read by a hook in the first step)
and its first three losses.

Last two lines, for the first workload reported (short when present):
WORKLOAD: same_config_peer=P speed_vs_fastest_peft=E (Q) train_mem_rss_vs_same_config_peer=F
    train_mem_anon_vs_same_config_peer=G
qlora_speed_vs_peft=A qlora_speed_vs_peft_matched=B qlora_train_mem_vs_peft=C qlora_vs_lora_step_time=D
    same_config_speed_vs_peft=S same_config_eval_loss_vs_peft=L
A: qforge's tokens/s over peft-recipe's; B: over the fastest PEFT row but the recipe; C: qforge's
training-phase peak RSS over peft-recipe's; D: qforge's step time over qforge-lora's. S: qforge's
tokens/s over P, the fastest PEFT row computing at qforge's default precision (the upcast rows:
peft-recipe, peft-ckpt-label-upcast, peft-matched-nockpt-upcast); L: the key
same_config_eval_loss_vs_peft of the train_quality.py result file --quality-json (nan without it).
E: qforge's tokens/s over Q, the fastest PEFT row of any precision; F, G: qforge's training peak RSS
and RssAnon over P's.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import proc_status, quantize_once  # noqa: E402
# the configurations, workloads and the report live in train_step_report.py; the names stay importable here
from train_step_report import (ALIASES, CONFIGS, LR, OLD_KEYS, PEER_ATTENTIONS, PEFT_CONFIGS,  # noqa: E402,F401
                               PROBE_CONFIG, QFORGE_CONFIGS, RANK, SAME_PRECISION, WORKLOADS, fmt, print_probe,
                               quality_ratio, ratios, report, same_config_line, summarise)


# ---- what every process measures ------------------------------------------------------------------
def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- preparation (the parent, once per output dir) ------------------------------------------------
def prepare_models(cache: Path, workloads: list[str]) -> dict[str, dict[str, str]]:
    """{model: {"bnb": 4-bit folder, "dense": bf16/float32 folder}} for the workloads' models;
    each written once under `cache`."""
    from qforge.model.load import smollm2_folder
    models = {}
    for name in sorted({WORKLOADS[w][0] for w in workloads}):
        if name == "smollm2":
            dense = smollm2_folder()
        else:
            dense = cache / "tinyllama-1.1b-random-bf16"
            if not (dense / "config.json").is_file():
                print(f"writing a random TinyLlama-1.1B-shaped bf16 checkpoint to {dense} (once)", flush=True)
                sys.path.insert(0, str(HERE))
                from load_memory import write_checkpoint  # noqa: E402
                write_checkpoint(dense)
            if not (dense / "tokenizer.json").is_file():  # the loaders want one; rows are ids modulo 32000
                from qforge.fileio import atomic_write_bytes
                for f in ("tokenizer_config.json", "tokenizer.json"):
                    atomic_write_bytes(dense / f, (smollm2_folder() / f).read_bytes())
        bnb = cache / f"{name}-nf4-dq-b64-bf16"
        quantize_once(dense, bnb)
        models[name] = {"bnb": str(bnb), "dense": str(dense)}
    return models


def prepare_batches(cache: Path, workload: str, steps: int, tinyllama_seq: int, batch_size: int | None) -> Path:
    """The workload's batches, tokenised once and saved (every process reads the same tensors)."""
    import torch
    from transformers import AutoTokenizer

    from qforge.eval.tasks import demo_task_paths
    from qforge.fileio import atomic_write_bytes
    from qforge.model.load import smollm2_folder
    from qforge.train.data import build_dataset, collate

    model, length, default_batch = WORKLOADS[workload]
    batch_size = batch_size or default_batch
    length = tinyllama_seq if length == "tinyllama_seq" else length
    path = cache / f"batches-{workload}-{length}-b{batch_size}-s{steps}.pt"
    if path.is_file():
        return path
    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    train, _, _ = build_dataset(demo_task_paths()["train"], tok, max_seq_len=256)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if length is None:
        batches = [collate([train[(s * batch_size + i) % len(train)] for i in range(batch_size)], pad)
                   for s in range(steps)]
    else:  # rows of `length` tokens: demo rows one after another, each keeping its own labels
        rows, ids, labels, k = [], [], [], 0
        while len(rows) < steps * batch_size:
            ex = train[k % len(train)]
            ids, labels, k = ids + list(ex["input_ids"]), labels + list(ex["labels"]), k + 1
            if len(ids) >= length:
                rows.append({"input_ids": ids[:length], "labels": labels[:length]})
                ids, labels = [], []
        batches = [collate(rows[s * batch_size:(s + 1) * batch_size], pad) for s in range(steps)]
    empty = [k for k, b in enumerate(batches) if not bool((b["labels"][:, 1:] != -100).any())]
    if empty:
        raise SystemExit(f"{workload}: batch(es) {empty} have no labelled token (rows of {length} tokens are all "
                         f"prompt); use longer rows")
    if model == "tinyllama":
        for b in batches:
            b["input_ids"] %= 32000
            b["labels"] = torch.where(b["labels"] == -100, b["labels"], b["labels"] % 32000)
    import io
    buf = io.BytesIO()
    torch.save(batches, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---- building each side ---------------------------------------------------------------------------
def build_peft(config: str, folder: str, attention: str | None):
    """bitsandbytes NF4 + PEFT LoRA for `config`; `attention` is the peer's attention for every row
    but the recipe (which keeps transformers' default)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    kwargs = {} if config == "peft-recipe" else {"attn_implementation": attention}
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qcfg, device_map="cpu",
                                                 dtype=torch.bfloat16, **kwargs)
    checkpointing = config == "peft-recipe" or config.startswith("peft-ckpt")
    if config == "peft-recipe" or config.endswith("-upcast"):  # the recipe's float32 upcast (and checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # what prepare_model_for_kbit_training does but its upcast: freeze, every float weight bf16
        for p in model.parameters():
            p.requires_grad = False
            if p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, opt


def peer_label_loss(model, batch: dict):
    """The peer's loss only where a label is, in transformers' own terms (no qforge code): the
    decoder stack's last hidden states (B, T, H), the positions whose next token is a label
    gathered to (N, H), the LM head on those N rows only, float32 token-mean cross-entropy: the
    value of `model(**batch).loss` with the head's work cut to the trained tokens."""
    import torch.nn.functional as F
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's wrapper or the model
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])               # (N, vocab)
    return F.cross_entropy(logits.float(), targets[keep])


def build_qforge(config: str, folders: dict):
    from qforge.train.config import TrainConfig
    from qforge.train.loop import make_optimizer
    from qforge.train.run import load_for_method

    lora = config == "qforge-lora"
    cfg = TrainConfig(model=folders["dense" if lora else "bnb"], method="lora" if lora else "qlora",
                      rank=RANK, alpha=2 * RANK, dropout=0.05, lr=LR, optimizer="adamw_8bit",
                      keep_base_outputs=False if config == "qforge-recompute" else None,
                      gradient_checkpointing=config != "qforge-nockpt",
                      residual_dtype="bfloat16" if config == "qforge-bf16res" else "auto")
    model, _ = load_for_method(cfg)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    return model, opt


def checkpoint_policy(model) -> str:
    """The gradient checkpointing the model's layers actually run, read from them."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        return "none"
    fn = layers[0]._gradient_checkpointing_func
    context_fn = getattr(fn, "keywords", {}).get("context_fn")
    name = getattr(context_fn, "__name__", "")
    if context_fn is None or name == "recompute_everything":
        return "full"
    if name == "keep_base_outputs":
        return "selective: frozen base products kept"
    return f"selective: {name}"


def child(args) -> None:
    import torch
    torch.manual_seed(0)
    baseline = proc_status("VmRSS")["VmRSS"]
    batches = torch.load(args.batches, weights_only=True)
    folders = json.loads(args.folders)
    t0 = time.perf_counter()
    if args.config.startswith("peft"):
        model, opt = build_peft(args.config, folders["bnb"], args.attention)
    else:
        model, opt = build_qforge(args.config, folders)
    load_s = time.perf_counter() - t0
    after_load = proc_status("VmHWM", "VmRSS")
    model.train()
    if args.config == "peft-recipe":
        def compute_loss(batch):
            return model(**batch, use_cache=False).loss
    elif args.config.startswith("peft-ckpt-label"):
        def compute_loss(batch):
            return peer_label_loss(model, batch)
    else:
        from qforge.train.loss import causal_lm_loss

        def compute_loss(batch):
            return causal_lm_loss(model, batch)
    residual = []
    decoder = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")][-1]

    def note_residual(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if not residual:
            residual.append(str(out.dtype).replace("torch.", ""))
    hook = decoder.register_forward_hook(note_residual)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses, times, tokens, reset_ok, at_reset = [], [], [], None, None
    sys.path.insert(0, str(HERE))
    from load_memory import AnonSampler  # noqa: E402
    sampler = AnonSampler(every=0.01)
    for i, batch in enumerate(batches[:args.warmup + args.steps]):
        if i == args.warmup:
            import gc
            gc.collect()
            malloc_trim()
            at_reset = proc_status("VmRSS")["VmRSS"]
            reset_ok = reset_peak()
            sampler.start()
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t
        losses.append(round(loss.item(), 4))
        if i == 0:
            hook.remove()
        if i >= args.warmup:
            times.append(elapsed)
            tokens.append(int(batch["attention_mask"].sum()))
    sampler.stop()
    end = proc_status("VmHWM", "VmRSS", "RssAnon", "RssFile")
    attn = getattr(model.config, "_attn_implementation", None)
    print(json.dumps({
        "workload": args.workload, "config": args.config, "index": args.index,
        "trainable": sum(p.numel() for p in trainable),
        "adapter_dtype": "/".join(sorted({str(p.dtype).replace("torch.", "") for p in trainable})),
        "residual_dtype": residual[0] if residual else None, "checkpointing": checkpoint_policy(model),
        "attention": (("qforge (matrix at SDPA's precision for short rows, else sdpa)" if residual
                       and residual[0] == "float32" else "qforge (matrix for short rows, else sdpa)")
                      if attn and attn.startswith("qforge") else attn),
        "batch_shape": list(batches[0]["input_ids"].shape),
        "tokens_per_step": statistics.mean(int(b["attention_mask"].sum()) for b in batches[:args.warmup + args.steps]),
        "label_tokens_per_step": statistics.mean(int((b["labels"][:, 1:] != -100).sum())
                                                 for b in batches[:args.warmup + args.steps]),
        "losses": losses, "step_s": times, "tokens": tokens, "tokens_per_s": sum(tokens) / sum(times),
        "load_s": load_s, "baseline_rss": baseline, "load_peak": after_load["VmHWM"],
        "rss_at_reset": at_reset, "train_peak": end["VmHWM"] if reset_ok else None,
        "end_rss_anon": end["RssAnon"], "end_rss_file": end["RssFile"], "train_peak_anon": sampler.peak,
        "threads": torch.get_num_threads(),
    }))


# ---- the parent: runs, records, report -------------------------------------------------------------
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process' finished children so far."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(out: Path, subdir: str, workload: str, config: str, index: int, steps: int, warmup: int,
              batches: Path, folders: dict, commit: str, attention: str | None) -> dict:
    """One fresh process of `config`; its record (with wall/CPU time, date, load) is written to
    OUT/SUBDIR/WORKLOAD/NAME/INDEX.json, NAME the config (runs/) or the attention (probe/)."""
    from qforge.fileio import atomic_write_bytes
    cmd = [sys.executable, __file__, "--child", "--workload", workload, "--config", config,
           "--index", str(index), "--steps", str(steps), "--warmup", str(warmup),
           "--batches", str(batches), "--folders", json.dumps(folders)]
    if attention and config != "peft-recipe" and config.startswith("peft"):
        cmd += ["--attention", attention]
    t, cpu = time.perf_counter(), children_cpu_s()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{workload} {config} ({attention or 'default'} attention) process {index} failed "
                         f"(exit {proc.returncode})")
    rec = json.loads(lines[-1])
    rec.update(commit=commit, wall_s=time.perf_counter() - t, cpu_s=children_cpu_s() - cpu,
               date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), loadavg=os.getloadavg()[0])
    name = attention if subdir == "probe" else config
    atomic_write_bytes(out / subdir / workload / name / f"{index}.json", json.dumps(rec).encode())
    return rec


def probe_attention(args, out: Path, workload: str, folders: dict, commit: str) -> str:
    """The peer's faster attention on this workload: PROBE_CONFIG with eager and with SDPA, 2 fresh
    processes each, interleaved; the table is printed, the faster by median tokens/s returned."""
    batches = prepare_batches(out / "cache", workload, 1 + args.probe_steps, args.tinyllama_seq, args.batch_size)
    for index in range(2):
        for attention in PEER_ATTENTIONS:
            rec = run_child(out, "probe", workload, PROBE_CONFIG, index, args.probe_steps, 1, batches, folders,
                            commit, attention)
            print(f"{workload} probe {PROBE_CONFIG} {attention} #{index}: {rec['tokens_per_s']:.1f} tok/s", flush=True)
    return print_probe(out / "probe" / workload, workload)


def run_all(args) -> None:
    out = Path(args.output_dir)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    models = prepare_models(cache, args.workloads)
    commit = git_commit()
    for workload in args.workloads:
        batches = prepare_batches(cache, workload, args.warmup + args.steps, args.tinyllama_seq, args.batch_size)
        folders = models[WORKLOADS[workload][0]]
        attention = args.peer_attention
        if attention == "auto" and any(c.startswith("peft") and c != "peft-recipe" for c in args.configs):
            attention = probe_attention(args, out, workload, folders, commit)
            print(f"{workload}: the peer's attention: {attention}", flush=True)
        for index in range(args.processes):
            for config in args.configs:
                rec = run_child(out, "runs", workload, config, index, args.steps, args.warmup, batches, folders,
                                commit, attention)
                print(f"{workload} {config} #{index}: {rec['tokens_per_s']:.1f} tok/s, train peak "
                      f"{(rec['train_peak'] or 0) / 1e9:.2f} GB (anon {rec['train_peak_anon'] / 1e9:.2f}), "
                      f"{rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU, losses {rec['losses'][:3]}, "
                      f"attention {rec['attention']}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=None,
                    help=f"comma-separated, of {', '.join(WORKLOADS)} (default short)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, of {', '.join(CONFIGS)} (default all; qforge-f32res is "
                         "accepted as qforge, whose residual stream is now float32)")
    ap.add_argument("--processes", type=int, default=5, help="fresh processes per configuration (default 5)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per step for every workload run (default: the workload's own, listed above)")
    ap.add_argument("--tinyllama-seq", type=int, default=256, help="row length of the tinyllama workload (default 256)")
    ap.add_argument("--output-dir", default="runs/train_step",
                    help="records (runs/), models and batches (cache/) (default runs/train_step)")
    ap.add_argument("--peer-attention", choices=("auto", *PEER_ATTENTIONS), default="auto",
                    help="the attention of every PEFT row but the recipe: auto (default) probes eager and sdpa "
                         "per workload and takes the faster; eager or sdpa forces it")
    ap.add_argument("--probe-steps", type=int, default=3,
                    help="timed steps of each attention-probe process, after 1 warm-up step (default 3)")
    ap.add_argument("--quality-json", default=None,
                    help="train_quality.py's JSON result file: its same_config_eval_loss_vs_peft goes on the "
                         "last line (nan without it)")
    ap.add_argument("--report-only", action="store_true",
                    help="print the tables from the records already in --output-dir (all workloads found, "
                         "or those of --workloads), run nothing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--workload", "--config", "--batches", "--folders", "--attention"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.workload_given = args.workloads is not None
    args.workloads = (args.workloads or "short").split(",")
    args.configs = list(dict.fromkeys(ALIASES.get(c, c) for c in args.configs.split(",")))
    bad = [w for w in args.workloads if w not in WORKLOADS] + [c for c in args.configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown workload/config {bad}; workloads: {list(WORKLOADS)}, configs: {list(CONFIGS)}")
    if min(args.processes, args.steps, args.warmup, args.batch_size or 1, args.tinyllama_seq, args.probe_steps) < 1:
        raise SystemExit("--processes, --steps, --warmup, --batch-size, --tinyllama-seq and --probe-steps must be >= 1")
    if args.quality_json and not Path(args.quality_json).is_file():
        raise SystemExit(f"--quality-json {args.quality_json}: no such file (train_quality.py's JSON result)")
    if not args.report_only:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
