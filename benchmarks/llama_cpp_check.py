"""llama.cpp itself runs qforge's GGUF export: greedy replies on the demo's held-out rows, side by side.

    .venv/bin/python benchmarks/llama_cpp_check.py --adapter runs/demo/adapter [--quant f16] [--rows 20]

1. Builds llama.cpp once, from the `llama-cpp-python` source package (pip download --no-binary;
   CMake, several minutes on 2 cores), into ~/.cache/qforge/llama_cpp/site (the venv is not
   touched; --cache to change). Needs cmake and a C++ compiler; pip fetches the build backend.
2. Exports the embedded SmolLM2 with ADAPTER merged (`qforge export --base smollm2 --quant QUANT`).
   Without --adapter, a small random adapter stands in (the comparison still holds; the exact-match
   figures then mean nothing).
3. For each held-out row: the chat-templated prompt as token ids (qforge's tokenizer), then up to
   --max-new-tokens greedy tokens, stopping at EOS, from qforge's runtime model (NF4 base + adapter,
   float32 compute) and from llama.cpp on the GGUF, fed the same ids.

With --lora, llama.cpp also runs the adapter as a LoRA GGUF (`qforge export --format gguf-lora`)
on a GGUF of the base alone (the adapter's B set to zero, then exported), as `llama-cli --lora` does.

Prints one line per row (same text or not, first differing position) and a last line:
    llama_cpp_same_text=K/N llama_cpp_token_agreement=X exact_match_qforge=A exact_match_llama_cpp=B
    [llama_cpp_lora_same_text=L/N llama_cpp_lora_vs_merged_same=M/N]
(token agreement: the share of generated positions, up to the first difference, where both agree,
over qforge's tokens). f16 and f32 should give the same text on nearly every row; q8_0 / q4_k_m
round the weights, so a few rows may part after some tokens.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "qforge" / "llama_cpp"
CMAKE_ARGS = ("-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF")


def build_llama_cpp(cache: Path, version: str | None, jobs: int) -> Path:
    """A folder holding an importable `llama_cpp` (built from source once); returns it."""
    site = cache / "site"
    if (site / "llama_cpp").is_dir():
        return site
    pip = [sys.executable, "-m", "pip"]
    spec = "llama-cpp-python" + (f"=={version}" if version else "")
    sdist, wheels = cache / "sdist", cache / "wheel"
    print(f"building llama.cpp from the {spec} source package (several minutes) ...", flush=True)
    subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(sdist)], check=True)
    archive = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))[-1]
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    subprocess.run(pip + ["wheel", "--no-deps", str(archive), "-w", str(wheels)], check=True, env=env)
    wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
    # its pure-Python needs beside it (numpy, jinja2, typing-extensions are the venv's already)
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel), "diskcache"], check=True)
    return site


def random_adapter(out: Path) -> Path:
    """A small random LoRA on the embedded model, when no trained adapter is given."""
    import torch

    from qforge.adapters import save_adapter
    from qforge.model.load import load_model
    from qforge.model.surgery import add_adapter, qlora_layers
    from qforge.nn import LoraSpec

    model, _ = load_model("smollm2", compute_dtype=torch.float32)
    add_adapter(model, "default", LoraSpec(r=8, alpha=16, dropout=0.0, dtype=torch.float32,
                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in qlora_layers(model):
            if "default" in layer.adapters:
                b = layer.adapters["default"].lora_B.weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    return save_adapter(model, out, base_model_name_or_path="smollm2")


def zero_adapter(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` with every lora_B zero: exporting it gives the base alone, as GGUF."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v.zero_() if ".lora_B." in k else v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def qforge_greedy(model, prompt_ids: list[int], max_new: int, eos: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos)] if eos in new else new


def llama_cpp_greedy(llm, prompt_ids: list[int], max_new: int, eos: int) -> list[int]:
    new = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == eos or len(new) >= max_new:
            break
        new.append(token)
    return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="trained adapter folder (default: a small random one)")
    parser.add_argument("--quant", default="f16", choices=("f32", "f16", "q8_0", "q4_k_m"), help="GGUF type (default: f16)")
    parser.add_argument("--rows", type=int, default=20, help="held-out rows to compare (default: 20)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per row (default: 48)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"build cache (default: {DEFAULT_CACHE})")
    parser.add_argument("--version", default=None, help="llama-cpp-python version to build (default: newest)")
    parser.add_argument("--lora", action="store_true", help="also run the adapter as a llama.cpp LoRA GGUF (default: off)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: 2)")
    args = parser.parse_args()

    import torch

    from qforge import cli
    from qforge.adapters import load_adapter
    from qforge.model.load import load_model
    from qforge.train.data import read_jsonl
    from qforge.eval.tasks import demo_task_paths, exact_match, prompt_messages

    sys.path.insert(0, str(build_llama_cpp(args.cache, args.version, args.jobs)))
    import llama_cpp

    work = Path(tempfile.mkdtemp(prefix="qforge-llama-cpp-"))
    adapter = Path(args.adapter) if args.adapter else random_adapter(work / "adapter")
    gguf_path = work / f"smollm2-{args.quant}.gguf"
    if cli.main(["export", "--base", "smollm2", "--adapter", str(adapter), "--out", str(gguf_path),
                 "--quant", args.quant]) != 0:
        sys.exit("qforge export failed")

    lora_llm = None
    if args.lora:
        base_path, lora_path = work / f"base-{args.quant}.gguf", work / "adapter-f16.gguf"
        zero = zero_adapter(adapter, work / "zero-adapter")
        for argv in (["--adapter", str(zero), "--out", str(base_path), "--quant", args.quant],
                     ["--adapter", str(adapter), "--out", str(lora_path), "--format", "gguf-lora"]):
            if cli.main(["export", "--base", "smollm2"] + argv) != 0:
                sys.exit("qforge export failed")
        lora_llm = llama_cpp.Llama(model_path=str(base_path), lora_path=str(lora_path), n_ctx=1024,
                                   n_threads=args.jobs, seed=0, verbose=False)

    model, tok = load_model("smollm2", compute_dtype=torch.float32)
    load_adapter(model, adapter)
    model.eval()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=args.jobs, seed=0, verbose=False)
    eos = tok.eos_token_id
    rows = read_jsonl(demo_task_paths()["test"])[: args.rows]
    same = agree = total = em_q = em_l = lora_same = lora_merged = 0
    for i, row in enumerate(rows):
        text = tok.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ours = qforge_greedy(model, ids, args.max_new_tokens, eos)
        theirs = llama_cpp_greedy(llm, ids, args.max_new_tokens, eos)
        first_diff = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        same += ours == theirs
        agree += len(ours) if ours == theirs else first_diff
        total += max(len(ours), 1)
        reply_q, reply_l = tok.decode(ours, skip_special_tokens=True), tok.decode(theirs, skip_special_tokens=True)
        em_q += exact_match(reply_q, row)
        em_l += exact_match(reply_l, row)
        status = "same" if ours == theirs else f"differs at token {first_diff}"
        if lora_llm is not None:
            with_lora = llama_cpp_greedy(lora_llm, ids, args.max_new_tokens, eos)
            lora_same += with_lora == ours
            lora_merged += with_lora == theirs
            status += ", lora same" if with_lora == ours else ", lora differs"
        print(f"row {i:3d}: {status:36s} qforge {reply_q.strip()[:60]!r}  llama.cpp {reply_l.strip()[:60]!r}")
    n = len(rows)
    print(f"llama_cpp_same_text={same}/{n} llama_cpp_token_agreement={agree / total:.3f} "
          f"exact_match_qforge={em_q / n:.2f} exact_match_llama_cpp={em_l / n:.2f}"
          + (f" llama_cpp_lora_same_text={lora_same}/{n} llama_cpp_lora_vs_merged_same={lora_merged}/{n}"
             if lora_llm is not None else ""))


if __name__ == "__main__":
    main()
