"""Estimate the memory of a fine-tuning run and recommend qlora, lora, full or FSDP.

  qforge plan [--model llama-3.1-8b] [--seq-len 512] [--batch-size 4] [--rank 16]
              [--method qlora|lora|full|all] [--gpu 24GB] [--num-gpus 1] [--offload-base]
              [--gradient-checkpointing | --no-gradient-checkpointing] [--objective sft|dpo|orpo]

With no flags it sizes what a plain `qforge train` runs on this machine: the same model, rank,
sequence length, batch, optimiser and quantisation (TrainConfig's defaults, read from
qforge/train/config.py) against the memory a run can use here now (the GPU's free memory, or the
available RAM without one; --device picks as train's does). --gpu plans a card instead.

--model is a shipped family (llama-3.1-8b/70b/405b, llama-3.2-1b/3b, mistral-7b, mistral-nemo-12b,
mixtral-8x7b/8x22b, qwen2.5-0.5b ... 72b, qwen3-8b, qwen3-30b-a3b, gemma-2-2b/9b/27b, yi-34b,
llama-2-13b, smollm2; any case, Hub spellings too: Meta-Llama-3.1-8B-Instruct, gemma-2-9b-it), a
Hugging Face config.json or a model folder holding one, a .gguf file (its metadata), or a Hub id
ORG/NAME in the local Hugging Face cache (its config.json; nothing is downloaded; a Hub id not
cached whose NAME is a shipped family is read as that family). For a mixture-of-experts model the
header adds the parameters a token runs through and the routed experts' 4-bit size. --gpu is the
memory of one card: 24GB (1e9 bytes), 24GiB (2**30), 80G or plain bytes.

The table gives GB (1e9 bytes) per component: base weights, quantisation constants, adapter
weights, gradients, optimiser state, activations with and without gradient checkpointing (the
one in use is counted), temporary buffers, the working set (sharded state counted once), what
each GPU holds, and whether that fits the card. Then the recommendation:
  BF16 LoRA when it fits one card with 10% of the card to spare; else QLoRA when it fits;
  full fine-tuning only when asked for (--method full) and it fits; else QLoRA sharded with
  FSDP over the fewest cards that hold it.
With --num-gpus N (or --offload-base) a second table gives what ONE GPU holds, component by
component (qforge.plan.per_rank): the 4-bit base, experts, embeddings/head/norms, adapters, their
gradients and the optimiser state each at 1/N (FSDP shards all of them), this GPU's rows of the
batch (--batch-size is the whole run's micro-batch; each GPU takes every N-th row), and the buffers:
the loss's logits, FSDP's two gathered blocks (the one computing and the one prefetched), the root
group (embeddings, head, final norm) gathered through the step, one block's adapter gradients for
the reduce-scatter. --offload-base keeps the 4-bit base in pinned host memory with two blocks of it
on the GPU at a time, and prints the host memory each process pins.
With --gpu the CUDA constants are used; the counts are from the code, but the constants for the CUDA
context, the allocator's slack and the logits are assumptions not yet measured on a GPU (the CPU
constants are measured: benchmarks/plan_calibration.py).
--objective dpo|orpo sizes a preference run: --batch-size counts pairs, each two sequences (chosen
and rejected) through the model in one batch; DPO's reference pass keeps no activations.
The formulas and the calibrated constants are in the docstrings of qforge/plan/memory.py.
"""
from __future__ import annotations

import argparse

from ..plan import (AUTO_KEEP_SHARE, CUDA_BF16, GATHERED_BLOCKS, METHODS, OFFLOAD_RESIDENT_BLOCKS, ModelArch, Plan,
                    active_parameter_count, available_memory, bits_per_param, card_label, constants_for,
                    expert_bytes, expert_parameter_count, format_gb, known_archs, load_arch, offload_host_bytes,
                    parameter_count, parse_gpu, per_rank, plan_run, recommend)
from ..train.config import OBJECTIVES, OPTIMIZERS, QUANT_TYPES, RESIDUAL_DTYPES, TrainConfig

ROWS = [("base weights", "base_weights"), ("quant constants", "quant_constants"),
        ("adapter weights", "adapter_weights"), ("gradients", "gradients"), ("optimizer state", "optimizer_state")]


def format_table(plans: list[Plan], other_activations: list[int], gradient_checkpointing: bool,
                 gpu_bytes: int) -> str:
    """The plan table: one row per component, one column per method, GB; see the module docstring.

    other_activations holds, per plan, the activations with checkpointing the other way; only
    the row marked '*' is counted in the totals.
    """
    on, off = ("*", " ") if gradient_checkpointing else (" ", "*")
    rows = [(label, [getattr(p, field) for p in plans]) for label, field in ROWS]
    with_gc = [p.activations if gradient_checkpointing else o for p, o in zip(plans, other_activations)]
    without = [o if gradient_checkpointing else p.activations for p, o in zip(plans, other_activations)]
    rows += [(f"activations, checkpointing {on}", with_gc), (f"activations, no checkpointing {off}", without),
             ("temporary buffers", [p.temporary for p in plans]), ("total (working set)", [p.total for p in plans])]
    gpus = plans[0].num_gpus
    if gpus > 1:
        rows.append((f"per GPU (of {gpus}, FSDP)", [p.per_gpu_total for p in plans]))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'':{width}}" + "".join(f"{p.method:>12}" for p in plans)]
    lines += [f"{label:{width}}" + "".join(f"{format_gb(v):>12}" for v in values) for label, values in rows]
    card = card_label(gpu_bytes)
    fits = "".join(f"{'yes' if p.fits(gpu_bytes) else 'no':>12}" for p in plans)
    lines.append(f"{'fits ' + card + ' card' + (' each' if gpus > 1 else ''):{width}}{fits}")
    lines.append(f"(* counted in the totals; GB = 1e9 bytes)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `qforge plan`; each default is `qforge train`'s (TrainConfig), so that a plain
    `qforge plan` sizes a plain `qforge train`."""
    from ..devices import CHOICES_HELP

    train = TrainConfig()
    parser.add_argument("--model", default=train.model, metavar="NAME_OR_CONFIG",
                        help=f"one of {', '.join(known_archs())} (any case, Hub spellings too); a config.json or "
                             "model folder; a .gguf file; or a Hub id ORG/NAME in the local Hugging Face cache "
                             "(default: qforge train's, " + train.model + ")")
    parser.add_argument("--seq-len", type=int, default=train.max_seq_len,
                        help="tokens per sequence (qforge train's --max-seq-len)")
    parser.add_argument("--batch-size", type=int, default=train.batch_size,
                        help="sequences per micro-batch (qforge train's); with --num-gpus N each GPU takes every "
                             "N-th row of it")
    parser.add_argument("--rank", type=int, default=train.rank, help="LoRA rank")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all",
                        help="recipe to size; 'all' shows each; 'full' also lets full fine-tuning be recommended")
    parser.add_argument("--gpu", default=None,
                        help="memory of one card: 24GB, 40GB, 80GB, 141GB, 80GiB or bytes (default: what a run can "
                             "use on this machine now: free GPU memory, or available RAM without a GPU)")
    parser.add_argument("--device", default=train.device,
                        help=f"the device whose free memory is planned when --gpu is not given: {CHOICES_HELP}")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="GPUs (processes) sharing the run with FSDP: each holds 1/N of the base, adapters, "
                             "gradients, optimiser state and embeddings")
    parser.add_argument("--offload-base", action="store_true",
                        help=f"plan qforge train --offload-base: the 4-bit base in pinned host memory, "
                             f"{OFFLOAD_RESIDENT_BLOCKS} blocks of it on the GPU at a time")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=train.gradient_checkpointing, help="recompute each layer in backward")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=train.optimizer,
                        help="AdamW variant, as qforge train takes it (adamw: torch's, 32-bit state)")
    parser.add_argument("--quant-type", choices=QUANT_TYPES, default=train.quant_type,
                        help="qlora's base: nf4/fp4 (4-bit, double quantisation) or hqq4/hqq3/hqq2 (HQQ at 4, 3 "
                             "or 2 bits; float16 scale and zero per --hqq-group-size values)")
    parser.add_argument("--hqq-group-size", type=int, default=train.hqq_group_size,
                        help="values per HQQ scale and zero-point")
    parser.add_argument("--objective", choices=OBJECTIVES, default=train.objective,
                        help="sft (demonstrations) or dpo/orpo (preference pairs: --batch-size counts pairs, "
                             "two sequences each; DPO's reference pass keeps no activations)")
    parser.add_argument("--residual-dtype", choices=RESIDUAL_DTYPES, default="auto",
                        help="the residual stream as qforge train takes it: auto (float32 for qlora and lora, "
                             "bfloat16 for full), bfloat16 or float32")


def memory_to_plan(args: argparse.Namespace) -> tuple[int, str, object]:
    """(bytes, where, constants): --gpu's card (CUDA constants), or what a run can use on this machine now
    (the device's free memory, its constants), as qforge train checks before it starts."""
    if args.gpu is not None:
        return parse_gpu(args.gpu), "card", CUDA_BF16
    from ..devices import resolve_device

    device = str(resolve_device(args.device))
    where = "free on " + device if device.startswith("cuda") else "of RAM available"
    return available_memory(device), f"{where} (this machine; --gpu to plan a card)", constants_for(device)


def run(args: argparse.Namespace) -> int:
    """Print the plan table and the recommendation; ValueError / FileNotFoundError for bad input."""
    if getattr(args, "offload_base", False) and args.method not in ("qlora", "all"):
        raise ValueError(f"--offload-base moves the 4-bit base of qlora to the host: use --method qlora or all, "
                         f"not {args.method}")
    gpu, where, constants = memory_to_plan(args)
    arch = ModelArch.from_config(load_arch(args.model), name=str(args.model))
    methods = METHODS if args.method == "all" else (args.method,)
    kwargs = dict(seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
                  num_gpus=args.num_gpus, optimizer=args.optimizer, quant_type=args.quant_type,
                  hqq_group_size=args.hqq_group_size, objective=getattr(args, "objective", "sft"),
                  constants=constants, chunked_loss=True,  # qforge train's loss
                  residual_bytes=2 if getattr(args, "residual_dtype", "auto") == "bfloat16" else 4)
    # auto: qforge train's float32 residual for lora and qlora (plan_run ignores it for full)
    if args.hqq_group_size < 1:
        raise ValueError(f"--hqq-group-size must be a positive integer, got {args.hqq_group_size}")
    gc = args.gradient_checkpointing
    plans = [plan_run(arch, m, gradient_checkpointing=gc, **kwargs) for m in methods]
    other = [plan_run(arch, m, gradient_checkpointing=not gc, **kwargs).activations for m in methods]
    method, reason = recommend(arch, gpu, gradient_checkpointing=gc, want_full=args.method == "full", **kwargs)
    print(f"{arch.name}: {parameter_count(arch) / 1e9:.2f} B parameters, {arch.num_layers} layers, "
          f"hidden {arch.hidden_size}, vocab {arch.vocab_size}"
          + (f", {arch.num_experts} experts ({arch.experts_per_token} per token)" if arch.num_experts else ""))
    if arch.num_experts:
        print(moe_summary(arch))
    objective = getattr(args, "objective", "sft")
    batch = (f"batch {args.batch_size} pair(s) = {2 * args.batch_size} sequences ({objective})" if objective != "sft"
             else f"batch {args.batch_size}")
    print(f"seq_len {args.seq_len}, {batch}, rank {args.rank}, {args.optimizer}, "
          f"gradient checkpointing {'on' if gc else 'off'}, "
          + (f"{args.num_gpus} GPU(s) of {card_label(gpu)}" if args.gpu is not None else f"{format_gb(gpu)} {where}"))
    print(f"qlora base: {args.quant_type}, {bits_per_param(args.quant_type, True, args.hqq_group_size):.3f} bits "
          f"per parameter (codes and constants)\n")
    print(format_table(plans, other, gc, gpu))
    kept = [(m, plan_run(arch, m, gradient_checkpointing=True, keep_base_outputs=True, **kwargs).activations
             - plan_run(arch, m, gradient_checkpointing=True, **kwargs).activations) for m in methods if m != "full"]
    if gc and kept:
        print(f"selective checkpointing (--keep-base-outputs; qforge train turns it on when the plan with it "
              f"fits in {AUTO_KEEP_SHARE:.0%} of memory) adds " + ", ".join(f"{format_gb(b)} ({m})" for m, b in kept))
    offload = bool(getattr(args, "offload_base", False))
    if args.num_gpus > 1 or offload:
        print("\n" + rank_table(arch, methods, args.num_gpus, offload, gpu, kwargs, gc))
    if args.gpu is not None:
        print("(CUDA constants: the tensor counts are from the code; the CUDA context, allocator slack and "
              "logit bytes are assumptions not yet measured on a GPU)")
    print(f"recommended: {method} ({reason})")
    default = TrainConfig().method
    ours = plan_run(arch, default, gradient_checkpointing=gc, **kwargs)
    print(f"qforge train with these settings runs {default} (its default; --method to change it): "
          f"{format_gb(ours.per_gpu_total)}, {'fits' if ours.fits(gpu) else 'does not fit'} in {card_label(gpu)}")
    return 0



RANK_ROWS = [("base (4-bit for qlora)", "base"), ("experts", "experts"), ("embeddings, head, norms", "embeddings"),
             ("adapters", "adapters"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
             ("activations (its rows)", "activations"), ("buffers", "buffers"), ("total per GPU", "total")]


def rank_table(arch: ModelArch, methods, num_gpus: int, offload: bool, gpu: int, kwargs: dict, gc: bool) -> str:
    """What one GPU of `num_gpus` holds, by component and method (qforge.plan.per_rank), GB; whether
    it fits; with offload, the pinned host memory of each process."""
    run = {k: v for k, v in kwargs.items() if k != "num_gpus"}
    methods = [m for m in methods if m == "qlora"] if offload else methods  # only a 4-bit base is offloaded
    if not methods:
        raise ValueError("--offload-base moves the 4-bit base of qlora to the host: use --method qlora or all")
    ranks = [per_rank(arch, m, world=num_gpus, gradient_checkpointing=gc, offload_base=offload, **run)
             for m in methods]
    width = max(len(label) for label, _ in RANK_ROWS) + 2
    how = f"one GPU of {num_gpus} (FSDP, everything sharded)" if num_gpus > 1 else "one GPU"
    lines = [f"{how}{', --offload-base' if offload else ''}:",
             f"{'':{width}}" + "".join(f"{m:>12}" for m in methods)]
    lines += [f"{label:{width}}" + "".join(f"{format_gb(r[key]):>12}" for r in ranks) for label, key in RANK_ROWS]
    lines.append(f"{'fits ' + card_label(gpu) + (' each' if num_gpus > 1 else ''):{width}}"
                 + "".join(f"{'yes' if r['total'] <= gpu else 'no':>12}" for r in ranks))
    if num_gpus > 1:
        lines.append(f"(buffers: the loss or the larger vocabulary matrix gathered, twice during its copy-out; "
                     f"{GATHERED_BLOCKS} gathered blocks; one block's gradients to reduce-scatter)")
    if offload:
        host = [offload_host_bytes(arch, m, num_gpus, run["quant_type"], True, run["hqq_group_size"])
                for m in methods]
        lines.append(f"{'pinned host, per process':{width}}" + "".join(f"{format_gb(h):>12}" for h in host))
        paper = [why for why, on in (("several processes", num_gpus > 1),) if on]
        if paper:  # what qforge.train.offload_base refuses today
            lines.append(f"(on paper: qforge train --offload-base does not take {' or '.join(paper)} yet)")
    return "\n".join(lines)


def moe_summary(arch: ModelArch) -> str:
    """One line on a mixture-of-experts model: active parameters, experts' share and 4-bit size."""
    total, experts = parameter_count(arch), expert_parameter_count(arch)
    shared = f", shared experts {arch.shared_expert_size} wide" if arch.shared_expert_size else ""
    dense = f", {arch.dense_layers} dense layer(s)" if arch.dense_layers else ""
    return (f"  {active_parameter_count(arch) / 1e9:.2f} B active per token; routed experts "
            f"{experts / 1e9:.2f} B ({experts / total:.0%}), each {arch.intermediate_size} wide{shared}{dense}; "
            f"experts in NF4 with double quantisation: {format_gb(expert_bytes(arch))}")
