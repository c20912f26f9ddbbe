"""GPU benchmark of the Triton kernels against the torch reference path (and bitsandbytes' CUDA
kernels when `import bitsandbytes` works).

    python benchmarks/gpu_bench.py [--quick] [--steps 6]

Sections (markdown tables): the card's copy bandwidth (a big bf16 tensor copy_, bytes read +
written / time); NF4+DQ dequantisation to bf16 (bytes read + written / time, and as a fraction of
the copy bandwidth); the fused dequantise-and-multiply for decode (M = 1, 16) and training
(M = 4096); the fused LoRA layer forward + backward; the gathered multi-adapter delta; and a
QLoRA train step of a small Llama (SmolLM2-135M when the embedded model loads, else a random
model of its shape) in tokens/s and peak memory with QFORGE_TRITON=0 (torch reference), =1
(Triton dequantisation and dequant-matmul through dispatch, QFORGE_FUSED_LORA=0) and "fused" (the
fused Triton LoRA layer that dispatch picks for a plain adapter without dropout on CUDA). Times are medians of CUDA-event timings.
Without CUDA it prints "no CUDA device" and exits 0. Last line: name=value figures.

`--smoke` runs every section on the CPU under Triton's interpreter with tiny shapes: it checks
the script, not the speed (its figures mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
from common import markdown_table  # noqa: E402

FIGURES: dict[str, float | str] = {}


@dataclass
class Profile:
    """Where and how big: the GPU run, or the CPU smoke run of the script itself."""
    device: str = "cuda"
    copy_elems: int = 512 * 2**20
    dequant_shapes: tuple = ((4096, 4096), (8192, 8192), (14336, 4096))
    width: int = 4096                 # matmul / LoRA / gathered layers are width x width
    matmul_ms: tuple = (1, 16, 4096)
    lora_m: int = 4096
    gathered: tuple = ((32, 1), (8, 128))
    batch: int = 8
    seq: int = 512
    tiny_model: bool = False


SMOKE = Profile(device="cpu", copy_elems=2**16, dequant_shapes=((64, 96), (32, 64)), width=96, matmul_ms=(1, 16, 140),
                lora_m=140, gathered=((3, 1), (2, 5)), batch=2, seq=16, tiny_model=True)
P = Profile()


def sync() -> None:
    if P.device == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn(), by CUDA events on the current stream (wall clock in the smoke run)."""
    for _ in range(warmup):
        fn()
    sync()
    if P.device != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


@contextlib.contextmanager
def env_setting(name: str, value: str):
    """name=value in the environment inside the block (dispatch reads it on every call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def triton_setting(value: str):
    """QFORGE_TRITON=value inside the block."""
    return env_setting("QFORGE_TRITON", value)


def section(name: str):
    """Run a benchmark section; an error is printed and the next section still runs."""
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n## {name}\n", flush=True)
            try:
                return fn(*args, **kwargs)
            except Exception:  # a broken section must not hide the others
                traceback.print_exc(limit=4)
                FIGURES[f"error_{fn.__name__}"] = 1
        return run
    return wrap


def bitsandbytes_cuda():
    """The bitsandbytes module when it imports and its CUDA 4-bit kernels run here, else None."""
    try:
        import bitsandbytes as bnb
        probe = torch.ones(64, device=P.device)
        bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(probe, blocksize=64, quant_type="nf4"),
                                       quant_type="nf4")
        return bnb
    except Exception as exc:  # not installed, or a build without CUDA kernels
        print(f"(bitsandbytes unavailable: {type(exc).__name__}: {str(exc)[:120]})")
        return None


def fmt_us(seconds: float) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e6:.1f}"


@section("copy bandwidth")
def copy_bandwidth(iters: int) -> float:
    src = torch.empty(P.copy_elems, dtype=torch.bfloat16, device=P.device).normal_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), iters)
    gbps = 2 * src.numel() * src.element_size() / t / 1e9
    row = [f"{src.numel() * 2 / 2**30:.3g} GiB bf16 copy_", f"{t * 1e3:.3f}", f"{gbps:.0f}"]
    print(markdown_table(["tensor", "time (ms)", "GB/s (read + write)"], [row]))
    FIGURES["copy_gbps"] = round(gbps, 1)
    del src, dst
    return gbps


def state_bytes(state) -> int:
    tensors = (state.packed, state.absmax, state.nested_absmax, state.nested_code)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@section("NF4 + double quant dequantisation to bf16")
def dequant_bench(copy_gbps: float, bnb, iters: int) -> None:
    """Every path writes into the same preallocated bf16 buffer (bitsandbytes through its `out=`),
    so no side pays an allocation the other does not. Figures are kept per shape
    (dequant_triton_frac_copy_<out>x<in>, ...); dequant_triton_frac_copy is the smallest over the
    shapes (the conservative one) and the speedups their medians."""
    from qforge.kernels import triton_dequant
    from qforge.quant import dequantize, quantize
    rows, fracs, vs_torch, vs_bnb = [], [], [], []
    for out_f, in_f in P.dequant_shapes:
        w = torch.randn(out_f, in_f, device=P.device, dtype=torch.bfloat16)
        state = quantize(w, "nf4", 64, True)
        buf = torch.empty(out_f * in_f, dtype=torch.bfloat16, device=P.device)
        moved = state_bytes(state) + buf.numel() * buf.element_size()
        times = {"triton": cuda_time(lambda: triton_dequant.dequantize_state(state, torch.bfloat16, out=buf), iters)}
        with triton_setting("0"):
            times["torch reference"] = cuda_time(lambda: dequantize(state, torch.bfloat16, out=buf), iters)
        if bnb is not None:
            q, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            out2d = buf.view(out_f, in_f)  # the same buffer, in the shape bitsandbytes writes
            bnb_into = lambda: bnb.functional.dequantize_4bit(q, qs, out=out2d, quant_type="nf4")  # noqa: E731
            try:
                bnb_into()
            except (NotImplementedError, RuntimeError) as exc:  # no out= kernel on this device
                print(f"(bitsandbytes row left out at {out_f}x{in_f}: its out= form fails here, and timing it "
                      f"with an allocation the other paths do not pay would not compare: {str(exc)[:80]})")
            else:
                times["bitsandbytes"] = cuda_time(bnb_into, iters)
        for name, t in times.items():
            gbps = moved / t / 1e9
            rows.append([f"{out_f}x{in_f}", name, fmt_us(t), f"{gbps:.0f}", f"{gbps / copy_gbps:.2f}"])
        tag = f"{out_f}x{in_f}"
        fracs.append(round(moved / times["triton"] / 1e9 / copy_gbps, 3))
        vs_torch.append(round(times["torch reference"] / times["triton"], 2))
        FIGURES[f"dequant_triton_frac_copy_{tag}"] = fracs[-1]
        FIGURES[f"dequant_triton_speedup_vs_torch_{tag}"] = vs_torch[-1]
        if "bitsandbytes" in times:
            vs_bnb.append(round(times["bitsandbytes"] / times["triton"], 2))
            FIGURES[f"dequant_triton_speedup_vs_bnb_{tag}"] = vs_bnb[-1]
        del w, state, buf
    FIGURES["dequant_triton_frac_copy"] = min(fracs)
    FIGURES["dequant_triton_speedup_vs_torch"] = statistics.median(vs_torch)
    if vs_bnb:
        FIGURES["dequant_triton_speedup_vs_bnb"] = statistics.median(vs_bnb)
    print(markdown_table(["weight", "path", "time (us)", "GB/s", "fraction of copy"], rows))
    print("\n(bytes = packed codes + absmax codes + nested absmax + bf16 output; every path writes into one "
          "preallocated output buffer; dequant_triton_frac_copy = the smallest over the weights, speedups = medians)")


@section("fused dequantise-and-multiply, y = x @ W^T (bf16, NF4 + DQ, blocksize 64)")
def matmul_bench(bnb, iters: int) -> None:
    import torch.nn.functional as F

    from qforge.kernels import triton_matmul
    from qforge.quant import dequantize, quantize
    rows = []
    out_f = in_f = P.width
    w = torch.randn(out_f, in_f, device=P.device, dtype=torch.bfloat16) * 0.02
    state = quantize(w, "nf4", 64, True)
    bnb_q = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) if bnb else None
    for M in P.matmul_ms:
        x = torch.randn(M, in_f, device=P.device, dtype=torch.bfloat16)
        times = {"triton (auto path)": cuda_time(lambda: triton_matmul.linear_4bit(x, state), iters),
                 "triton fused kernel (forced)": cuda_time(lambda: triton_matmul.qmatmul(x, state, fused=True), iters),
                 "triton dequant + cuBLAS": cuda_time(lambda: F.linear(x, dequantize(state, torch.bfloat16)), iters),
                 "dense bf16 cuBLAS (no 4-bit)": cuda_time(lambda: F.linear(x, w), iters)}
        with triton_setting("0"):
            times["torch dequant + cuBLAS"] = cuda_time(lambda: F.linear(x, dequantize(state, torch.bfloat16)), iters)
        if bnb_q is not None:
            q, qs = bnb_q
            times["bitsandbytes matmul_4bit"] = cuda_time(lambda: bnb.matmul_4bit(x, q.t(), quant_state=qs), iters)
        for name, t in times.items():
            rows.append([M, name, fmt_us(t), f"{2 * M * out_f * in_f / t / 1e12:.2f}"])
        tag = {1: "decode", 16: "m16"}.get(M, "train")
        FIGURES[f"matmul_{tag}_us_triton"] = round(times["triton (auto path)"] * 1e6, 1)
        FIGURES[f"matmul_{tag}_speedup_vs_torch"] = round(
            times["torch dequant + cuBLAS"] / times["triton (auto path)"], 2)
        FIGURES[f"matmul_{tag}_fused_kernel_vs_dequant_cublas"] = round(
            times["triton dequant + cuBLAS"] / times["triton fused kernel (forced)"], 2)
    print(markdown_table(["M", "path", "time (us)", "TFLOP/s"], rows))
    print(f"\n(auto: the fused kernel up to M = {triton_matmul.FUSED_MAX_M}, else Triton dequantisation + cuBLAS;"
          " fused_kernel_vs_dequant_cublas > 1 where the fused kernel wins: set FUSED_MAX_M from it)")


@section("fused LoRA layer, forward + backward (bf16, width x width NF4 + DQ, r = 16, M = lora_m)")
def lora_bench(iters: int) -> None:
    import torch.nn.functional as F

    from qforge.kernels import triton_lora, triton_matmul
    from qforge.quant import dequantize, quantize
    out_f, in_f, r, M, s = P.width, P.width, 16, P.lora_m, 2.0
    state = quantize(torch.randn(out_f, in_f, device=P.device) * 0.02, "nf4", 64, True)
    x = torch.randn(M, in_f, device=P.device, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, in_f, device=P.device) * 0.01).to(torch.bfloat16).requires_grad_()
    B = (torch.randn(out_f, r, device=P.device) * 0.01).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(M, out_f, device=P.device, dtype=torch.bfloat16)

    def fused():
        triton_lora.lora_linear_4bit(x, state, A, B, s).backward(grad)

    def fused_forced():
        with mock.patch.object(triton_matmul, "FUSED_MAX_M", 1 << 30):
            fused()

    def torch_path():  # what the layer does without Triton: dequantise, cuBLAS, LoRA as two small matmuls
        w = dequantize(state, torch.bfloat16)
        (F.linear(x, w) + F.linear(F.linear(x, A), B) * s).backward(grad)

    rows = []
    times = {"triton LoRA layer (auto path)": cuda_time(fused, iters),
             "triton LoRA layer, fused kernel (forced)": cuda_time(fused_forced, iters),
             "triton dequant + cuBLAS": cuda_time(torch_path, iters)}
    with triton_setting("0"):
        times["torch dequant + cuBLAS"] = cuda_time(torch_path, iters)
    for name, t in times.items():
        rows.append([name, f"{t * 1e3:.3f}", f"{6 * M * out_f * in_f / t / 1e12:.1f}"])
    print(markdown_table(["path", "fwd + bwd (ms)", "base TFLOP/s"], rows))
    FIGURES["lora_fwd_bwd_ms_triton"] = round(times["triton LoRA layer (auto path)"] * 1e3, 3)
    FIGURES["lora_fwd_bwd_speedup_vs_torch"] = round(
        times["torch dequant + cuBLAS"] / times["triton LoRA layer (auto path)"], 2)


@section("gathered multi-adapter delta (bf16, width -> width, 8 adapters, r = 16)")
def gathered_bench(iters: int) -> None:
    from qforge.kernels import triton_lora
    K, r, n, rows = 8, 16, P.width, []
    A = torch.randn(K, r, n, device=P.device, dtype=torch.bfloat16) * 0.01
    B = torch.randn(K, n, r, device=P.device, dtype=torch.bfloat16) * 0.01
    scalings = torch.full((K,), 2.0, device=P.device)
    for nb, T in P.gathered:
        x = torch.randn(nb, T, n, device=P.device, dtype=torch.bfloat16)
        slots = torch.arange(nb, device=P.device) % (K + 1)  # slot K: no adapter

        def torch_path():  # the torch reference of the serving slots' delta: gather, two bmm
            Az = torch.cat([A, A.new_zeros(1, r, n)])
            Bz = torch.cat([B * scalings[:, None, None].to(B.dtype), B.new_zeros(1, n, r)])
            return torch.bmm(torch.bmm(x, Az[slots].transpose(1, 2)), Bz[slots].transpose(1, 2))

        t_tri = cuda_time(lambda: triton_lora.gathered_lora(x, A, B, slots, scalings), iters)
        t_ref = cuda_time(torch_path, iters)
        rows += [[f"{nb}x{T}", "triton", fmt_us(t_tri)], [f"{nb}x{T}", "torch gather + bmm", fmt_us(t_ref)]]
        FIGURES[f"gathered_{nb}x{T}_speedup_vs_torch"] = round(t_ref / t_tri, 2)
    print(markdown_table(["rows x tokens", "path", "time (us)"], rows))


def build_model(rank: int, embedded: bool):
    """(QLoRA model on CUDA, description): SmolLM2-135M when asked for and it loads, else a random
    Llama of its shape (speed does not depend on the weights)."""
    from qforge.model.surgery import add_adapter, linear_names, quantize_linears, select_targets
    from qforge.nn import LoraSpec
    spec = LoraSpec(r=rank, alpha=2 * rank, dropout=0.0)  # no dropout: the fused layer has none
    if embedded:
        try:
            from qforge.model.load import load_model
            model, _ = load_model("smollm2")
            add_adapter(model, "default", spec)
            return model.to(P.device), "SmolLM2-135M-Instruct (embedded)"
        except Exception as exc:
            print(f"(embedded model unavailable: {type(exc).__name__}: {str(exc)[:120]}; using a random Llama)")
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    if P.tiny_model:
        shape = dict(vocab_size=512, hidden_size=72, intermediate_size=96, num_hidden_layers=2)
    cfg = LlamaConfig(**shape, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=P.device, dtype=torch.bfloat16)
    quantize_linears(model, select_targets(linear_names(model), "all-linear"))
    add_adapter(model, "default", spec)
    return model, "random Llama of SmolLM2-135M's shape"


def time_steps(model, ids, steps: int) -> tuple[float, float, float, float]:
    """(tokens/s, peak GiB, first loss, last loss) over `steps` AdamW steps after 2 warm-up steps.
    The losses let the paths be compared: the same start and data give nearly the same curve."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(P.device, dtype=torch.bfloat16):  # as train/loop does: norms stay float32
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = step().item()
    step()
    sync()
    if P.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if P.device == "cuda" else float("nan")
    return ids.numel() * steps / (time.perf_counter() - t0), peak, first, last.item()


@section("QLoRA train step (all linear layers NF4 + DQ, r = 16, bf16, gradient checkpointing)")
def train_bench(steps: int, embedded: bool) -> None:
    batch, seq = P.batch, P.seq
    from qforge.model.surgery import prepare_for_kbit_training
    model, what = build_model(16, embedded)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=P.device,
                        generator=torch.Generator(device=P.device).manual_seed(0))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    modes = {"torch (QFORGE_TRITON=0)": (triton_setting("0"), env_setting("QFORGE_FUSED_LORA", "0")),
             "triton dequant (QFORGE_TRITON=1, QFORGE_FUSED_LORA=0)": (triton_setting("1"),
                                                                        env_setting("QFORGE_FUSED_LORA", "0")),
             "fused LoRA layer (QFORGE_FUSED_LORA=1)": (triton_setting("1"), env_setting("QFORGE_FUSED_LORA", "1"))}
    rows = []
    for name, (env, patch) in modes.items():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])  # every mode starts from the same adapter weights
        with env, patch:
            tok_s, peak, first, last = time_steps(model, ids, steps)
        rows.append([name, f"{tok_s:,.0f}", f"{peak:.2f}", f"{first:.4f}", f"{last:.4f}"])
        key = name.split()[0]
        FIGURES[f"train_tok_s_{key}"] = round(tok_s)
        FIGURES[f"train_peak_gib_{key}"] = round(peak, 2)
    print(f"{what}; batch {batch} x {seq} tokens, {steps} timed steps after 2 warm-up, torch AdamW\n")
    print(markdown_table(["path", "tokens/s", "peak GiB", "step-0 loss", "last loss"], rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats; random model, not the embedded one")
    ap.add_argument("--steps", type=int, default=6, help="timed train steps per path")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU + Triton interpreter, tiny shapes: checks the script only")
    ap.add_argument("--only", choices=("all", "dequant"), default="all",
                    help="dequant: only the copy bandwidth and the dequantisation sections "
                         "(what benchmarks/gpu_check.sh needs; default: all)")
    args = ap.parse_args()
    global P
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        P, args.quick, args.steps = SMOKE, True, 1
    elif not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    try:
        import triton
    except Exception as exc:
        print(f"triton does not import: {exc}\ntriton=missing")
        return 0
    name = (torch.cuda.get_device_name() if P.device == "cuda"
            else "CPU smoke run (Triton interpreter; figures meaningless)")
    print(f"# qforge GPU benchmark: {name}, torch {torch.__version__}, triton {triton.__version__}")
    iters = 2 if args.smoke else 5 if args.quick else 20
    try:
        copy_gbps = copy_bandwidth(iters) or float("nan")
        bnb = bitsandbytes_cuda()
        dequant_bench(copy_gbps, bnb, iters)
        if args.only == "dequant":
            return 0
        matmul_bench(bnb, iters)
        lora_bench(iters)
        gathered_bench(iters)
        train_bench(args.steps, embedded=not args.quick)
    finally:
        FIGURES["kernel_tests"] = os.environ.get("QFORGE_KERNEL_TESTS", "not-run")
        print("\n" + " ".join(f"{k}={v}" for k, v in FIGURES.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
