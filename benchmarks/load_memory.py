"""Peak memory and time of loading a 1.1B-parameter Llama into 4 bits: qforge vs transformers + bitsandbytes.

The checkpoint is random (TinyLlama's shape: hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads, vocab 32000, untied lm_head), written once as 4 bf16 safetensors shards under
$QFORGE_CACHE/bench, tensor by tensor (the model is never built). Each loader then runs in a fresh
subprocess, which reports its peak resident set (the kernel's VmHWM, the high-water mark of
RSS: the Python/torch/transformers import baseline included, nothing subtracted) and the load
time (imports excluded). Both read the files from a warm page cache.

    .venv/bin/python benchmarks/load_memory.py

The last line is `peak_rss_vs_bf16=X peak_rss_vs_bnb=Y load_time_vs_bnb=Z load_peak_vs_bf16=W
peak_anon_vs_bnb=V`: qforge's peak RSS over the checkpoint's bf16 bytes, qforge over transformers +
bitsandbytes for peak RSS and load time, W: what loading adds to the process' peak (peak RSS minus
the RSS after the imports) over the bf16 bytes, and V: the two loaders' peaks of anonymous memory.

RSS counts file pages mapped into the process (transformers reads safetensors through mmap; those
pages are page cache the kernel can drop, not memory the loader allocated), so each side also
reports RssAnon (/proc/self/status: its anonymous memory): its peak while loading (sampled every
5 ms by a thread) and after loading, beside RssFile after loading.

Why both X and W: X counts the interpreter with torch and transformers' Llama code imported
(~425-485 MB, the same for any loader) and the loaded model itself, which QLoRA keeps by design
(this checkpoint: 484 MB of NF4 codes, 262 MB of bf16 embedding and head, constants: 762 MB).
Those two alone are 0.55-0.57 of the bf16 bytes for a 1.1B model, so X cannot go below that
whatever the loader does; W is the loader's own cost (the streamed tensors, the transient
buffers) and the figure that says whether the bf16 model was ever materialised (it would be >= 1).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import proc_status, status_bytes  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
             rms_norm_eps=1e-5, dtype="bfloat16")
SHARDS = 4
NAME = "llama-1.1b-random-bf16"


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Llama checkpoint, in file order, with its shape."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], gen) -> None:
    """A bf16 safetensors file written one tensor at a time: header first (offsets follow from the
    shapes), then each tensor generated (N(0, 0.02); norms 1) and written as it comes."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in entries:
        n = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape in entries:
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)
            f.write(memoryview(t.view(torch.uint8).numpy()))
            del t


def write_checkpoint(folder: Path) -> None:
    """config.json, SHARDS bf16 shards of about equal size and their index, atomically."""
    import torch
    from transformers import LlamaConfig

    from qforge.model.checkpoint import write_new_folder

    entries = tensor_shapes(SHAPE)
    sizes = [2 * torch.Size(s).numel() for _, s in entries]
    total, groups, acc = sum(sizes), [[] for _ in range(SHARDS)], 0
    for entry, size in zip(entries, sizes):
        groups[min(SHARDS - 1, acc * SHARDS // total)].append(entry)
        acc += size
    gen = torch.Generator().manual_seed(0)

    def write(tmp: Path) -> None:
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
            _write_shard(tmp / name, group, gen)
            weight_map.update({key: name for key, _ in group})
            print(f"  wrote {name} ({len(group)} tensors)", flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        LlamaConfig(**SHAPE).to_json_file(str(tmp / "config.json"))

    write_new_folder(folder, write)


def peak_rss() -> int:
    """This process' peak resident set in bytes: VmHWM, which exec resets. (ru_maxrss is not reset
    by exec on Linux: a child would report its parent's peak when that was higher.)"""
    try:
        return status_bytes("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class AnonSampler:
    """The peak of RssAnon while loading, read every 5 ms by a thread (the kernel keeps a
    high-water mark for the whole RSS only; a peak shorter than 5 ms can be missed)."""

    def __init__(self, every: float = 0.005):
        import threading
        self.every, self.peak, self.first = every, 0, status_bytes("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, status_bytes("RssAnon"))
            self._done.wait(self.every)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


# ---- the measured children ----------------------------------------------------------------------
def model_bytes(model) -> int:
    """Bytes of every distinct tensor the loaded model holds: parameters, buffers and the 4-bit
    layers' quantisation state (qforge's QuantState, bitsandbytes' QuantState and its state2)."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        qs = (getattr(module, "quant_state", None) or getattr(getattr(module, "weight", None), "quant_state", None)
              or getattr(getattr(module, "base", None), "quant_state", None))  # qforge's AdaptedLinear
        for state in (qs, getattr(qs, "state2", None)):
            if state is not None:
                tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
    seen = {}
    for t in tensors:
        seen[(t.data_ptr(), t.dtype, t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def child(loader: str, folder: str) -> None:
    """Import, note the baseline, load, report JSON on stdout."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM  # noqa: F401

    # The baseline: torch, transformers' Llama modelling code and the loader's own library imported.
    if loader == "qforge":
        from qforge.model.load import load_model
    else:
        import bitsandbytes  # noqa: F401
    baseline = peak_rss()
    sampler = AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    if loader == "qforge":
        model, _ = load_model(folder)
        packed = model.model.layers[0].mlp.down_proj.weight
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
        packed = model.model.layers[0].mlp.down_proj.weight.data
    seconds = time.perf_counter() - t0
    sampler.stop()
    four_bit = sum(1 for m in model.modules() if "4bit" in type(m).__name__  # bitsandbytes' Linear4bit
                   or "4bit" in type(getattr(m, "base", None)).__name__)  # qforge's AdaptedLinear on a 4-bit base
    checksum = int(packed.view(torch.uint8).to(torch.int64).sum())
    after = proc_status("RssAnon", "RssFile")
    print(json.dumps({"baseline": baseline, "peak": peak_rss(), "seconds": seconds, "layers": four_bit,
                      "checksum": checksum, "model": model_bytes(model), "peak_anon": sampler.peak,
                      "anon": after["RssAnon"], "file": after["RssFile"], "baseline_anon": sampler.first}))


def run_child(loader: str, folder: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", loader, str(folder)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{loader} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from qforge.paths import cache_dir

    folder = cache_dir("bench") / NAME
    if not (folder / "config.json").is_file():
        print(f"writing the random checkpoint to {folder} (once)", flush=True)
        write_checkpoint(folder)
    shards = sorted(folder.glob("*.safetensors"))
    bf16 = sum(p.stat().st_size for p in shards)
    for p in shards:  # warm the page cache so that neither loader pays for the disk
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    results = {name: run_child(name, folder) for name in ("qforge", "bnb")}
    print(f"\ncheckpoint: {folder}\n  {len(shards)} bf16 shards, {bf16 / 1e9:.3f} GB "
          f"({bf16 // 2 / 1e9:.3f} B parameters)\n")
    print("| loader | import baseline RSS | loaded model's tensors | peak RSS | peak RSS / bf16 bytes "
          "| peak RssAnon | RssAnon after load | RssFile after load | load time | 4-bit layers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, label in (("qforge", "qforge load_model"), ("bnb", "transformers + bitsandbytes")):
        r = results[name]
        print(f"| {label} | {r['baseline'] / 1e6:,.0f} MB | {r['model'] / 1e6:,.0f} MB | {r['peak'] / 1e6:,.0f} MB "
              f"| {r['peak'] / bf16:.3f} | {r['peak_anon'] / 1e6:,.0f} MB | {r['anon'] / 1e6:,.0f} MB "
              f"| {r['file'] / 1e6:,.0f} MB | {r['seconds']:.1f} s | {r['layers']} |")
    q, b = results["qforge"], results["bnb"]
    print(f"\nsame packed bytes in layer 0 down_proj: {q['checksum'] == b['checksum']}")
    print(f"peak_rss_vs_bf16={q['peak'] / bf16:.3f} peak_rss_vs_bnb={q['peak'] / b['peak']:.3f} "
          f"load_time_vs_bnb={q['seconds'] / b['seconds']:.3f} "
          f"load_peak_vs_bf16={(q['peak'] - q['baseline']) / bf16:.3f} "
          f"peak_anon_vs_bnb={q['peak_anon'] / b['peak_anon']:.3f}")


if __name__ == "__main__":
    main()
