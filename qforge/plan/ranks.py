"""Memory of one rank of an N-process run: every sharded component at 1/N, what stays whole, FSDP's buffers.

The layout this prices is qforge.dist.shard's after issue 26: each transformer block is one FSDP2
group (its 4-bit codes and absmax in a flat float storage, its adapters, norms and any other
parameter); the input embeddings and the output layer are groups of their own (one when tied);
the root group holds what is left (the final norm). Every
parameter is chunked on dim 0 over the `world` ranks; the adapters (and so their gradients and the
8-bit AdamW state) in shards aligned to the optimiser's 256-value blocks. `per_rank` returns bytes
by component with the keys of qforge.dist.shard.held_bytes, so that a measured rank and the plan
compare key by key:

  base        4-bit codes + absmax of the dense linears, ceil(bytes / N) each (2-byte storage
              elements); the second-level constants (a few bytes per 16k weights) stay whole
  experts     the same for MoE expert banks (0 for a dense model)
  adapters    LoRA A [r, in] and B [out, r]: FSDP's dim-0 chunk, ceil(rows / N) rows, adapter_bytes a
              value; whole on every rank when the chunk is not a whole number of the 8-bit
              optimiser's 256-value blocks (qforge.dist.shard.keeps_blocks, mirrored in adapter_local)
  gradients   as adapters (FSDP reduce-scatters them into the rank's shard)
  optimizer   8-bit AdamW on the shard: 2 bytes a value + two float32 absmax per 256; a tensor
              under 4096 values (whole) keeps 32-bit state, 8 bytes a value
  embeddings  embeddings, output layer (untied), norms, routers, biases: ceil(numel / N) each
  activations this rank's rows of the micro-batch, saved for backward: batch_size is the run's
              micro-batch, and each rank takes every world-th row (qforge.dist.Group.rows), so
              ceil(batch_size / world) rows, at least one (a rank without rows runs one at weight 0)
  buffers     transient: the loss's logits, one dequantised weight, the device context and the
              allocator's slack (memory.temporary_bytes), and for world > 1 FSDP's gathers, in the
              layout of qforge.dist.shard (one group per block; the input embeddings and the output
              layer groups of their own, one group when tied, resharded right after their use; the
              root group, the final norm, gathered through the step):
                vocabulary gather  the larger vocabulary group (vocab_group_bytes, in the dtype the
                        run holds it) twice while it is gathered: FSDP2's all-gather output and the
                        unsharded parameter coexist during copy-out. The embeddings' gather comes
                        before the loss, the head's (gathered again for its backward) with the
                        loss's chunk; so the larger of (context + 2 x group) and (the one-process
                        transient + the head's group once) counts
                GATHERED_BLOCKS whole blocks (the one computing and the one prefetched: FSDP2
                        prefetches the next block's all-gather in backward), the root group whole,
                        and one block's adapter gradients unsharded (the reduce-scatter's input)
              scale.py measured the embedded model (tied, float32 108 MiB) at N=2: +217 MiB right
              after the embedding's all-gather, then flat through the blocks
  total       the sum: the rank's peak

offload_base (qforge train --offload-base): the 4-bit base (this rank's shard of it) lives in
pinned host memory and OFFLOAD_RESIDENT_BLOCKS blocks of it are on the device at once (the block
computing and the next, prefetched); `offload_host_bytes` is the host side.
"""
from __future__ import annotations

import math

from .arch import ModelArch, as_arch, model_weights
from .memory import (CUDA_BF16, OPTIM_BLOCK, OPTIM_MIN_NUMEL, OPTIMIZER_BITS, MemoryConstants,
                     code_bits, plan_run, quant_constant_bytes)

RANK_KEYS = ("base", "adapters", "gradients", "optimizer", "embeddings", "experts", "activations", "buffers")
GATHERED_BLOCKS = 2  # FSDP2: the block computing and the next one, whose all-gather is prefetched
OFFLOAD_RESIDENT_BLOCKS = 2  # --offload-base: the block computing and the next, copied ahead of its use
GATHER_COPIES = 2  # a gathered group during copy-out: FSDP2's all-gather output and the unsharded parameter
OUTSIDE_BLOCKS = ("norm", "embed_tokens", "lm_head")  # tensors outside the blocks (model_weights' names)
VOCABULARY = ("embed_tokens", "lm_head")  # groups of their own (qforge.dist.shard._vocabulary_groups)
STORAGE_BYTES = 2  # the sharded 4-bit storage's element (bfloat16): a shard is whole elements


def shard(numel: int, world: int, align: int = 1) -> int:
    """Values of a tensor of `numel` values on one rank: dim-0 chunks of ceil(numel / world), rounded
    up to whole `align`-value blocks (FSDP pads the last rank's chunk; every rank holds the size).
    One process holds the tensor as it is."""
    if world == 1:
        return numel
    blocks = math.ceil(numel / align)
    return math.ceil(blocks / world) * align


def quantised_split(numel: int, world: int, quant_type: str = "nf4", double_quant: bool = True,
                    group_size: int = 64) -> tuple[int, int]:
    """(bytes on one rank, bytes whole) of one 4-bit tensor of `numel` weights: the packed codes and
    the first-level absmax (HQQ: scales and zeros) sharded in STORAGE_BYTES elements; the second-level
    constants whole on every rank."""
    bits = code_bits(quant_type)
    codes = (numel + 1) // 2 if bits == 4 else math.ceil(numel * bits / 8)
    constants = quant_constant_bytes(numel, double_quant, quant_type, group_size)
    first = math.ceil(numel / 64) if not quant_type.startswith("hqq") and double_quant else constants
    whole_part = constants - first
    sharded = sum(shard(math.ceil(b / STORAGE_BYTES), world) * STORAGE_BYTES for b in (codes, first))
    return sharded + whole_part, codes + constants


def _frozen_bytes(w, method: str) -> int:
    """Bytes a copy of a non-4-bit frozen tensor takes per value (memory.weight_bytes' dtypes)."""
    if method != "qlora":
        return 2
    return {"norm": 4, "embedding": 2, "router": 2, "bias": 2}.get(w.kind, 2)


def weight_split(arch: ModelArch, method: str, world: int, quant_type: str = "nf4", double_quant: bool = True,
                 group_size: int = 64) -> dict[str, int]:
    """Per-rank bytes of base, experts and embeddings, the whole-model bytes of each (`<key>_whole`)
    and of one block (`block`: a layer's tensors, whole, as FSDP gathers it) and of the root group
    (`root`: the final norm; the vocabulary matrices are groups of their own, vocab_group_bytes).
    lora/full: every linear is BF16 and counts as base."""
    out = dict.fromkeys(("base", "experts", "embeddings", "base_whole", "experts_whole", "embeddings_whole",
                         "block", "root"), 0)
    for w in model_weights(arch):
        if w.kind == "linear" and method == "qlora":
            local, whole = quantised_split(w.numel, world, quant_type, double_quant, group_size)
            key = "experts" if w.name.startswith("experts.") else "base"
        else:
            size = 2 if w.kind == "linear" else _frozen_bytes(w, method)
            local, whole = shard(w.numel, world) * size, w.numel * size
            key = "base" if w.kind == "linear" else "embeddings"
        out[key] += local * w.copies
        out[key + "_whole"] += whole * w.copies
        if w.name in VOCABULARY:
            pass  # groups of their own: vocab_group_bytes
        elif w.name in OUTSIDE_BLOCKS:
            out["root"] += whole
        else:
            out["block"] += whole  # one copy: a layer that has every kind (an upper bound for mixed stacks)
    return out


def state_bytes(local: int, numel: int, eight_bit: bool) -> int:
    """AdamW's two moments for `local` values of a tensor of `numel` (memory.optimizer_bytes): 8-bit,
    2 bytes a value and two float32 absmax per 256, for tensors of at least 4096 values; else 8 bytes."""
    if eight_bit and numel >= OPTIM_MIN_NUMEL:
        return 2 * local + 8 * math.ceil(local / OPTIM_BLOCK)
    return 8 * local


def adapter_local(rows: int, cols: int, world: int) -> int:
    """Values of a [rows, cols] trainable tensor on one rank: FSDP's dim-0 chunk of ceil(rows / world)
    rows, or the whole tensor when that chunk would cut the 8-bit optimiser's 256-value blocks (a
    tensor of at least 4096 values whose chunk is not whole blocks: qforge.dist.shard.keeps_blocks)."""
    chunk = math.ceil(rows / world) * cols
    if world == 1 or (rows * cols >= OPTIM_MIN_NUMEL and chunk % OPTIM_BLOCK):
        return rows * cols
    return chunk


def adapter_shapes(arch: ModelArch, rank: int) -> list[tuple[int, int, int]]:
    """(rows, cols, copies) of every LoRA tensor: A [r, in] and B [out, r] of each adapted matrix."""
    return [shape for w in model_weights(arch) for fan_in, fan_out in w.adapted
            for shape in ((rank, fan_in, w.copies), (fan_out, rank, w.copies))]


def trained_split(arch: ModelArch, rank: int, world: int, optimizer: str = "paged_adamw_8bit",
                  adapter_bytes: int = 4) -> dict[str, int]:
    """Per-rank bytes of the adapters, their gradients and AdamW's state (adapter_local), the
    whole-model figure of each, and one block's adapters whole (`block_adapters`)."""
    eight_bit = OPTIMIZER_BITS[optimizer] == 8
    out = dict.fromkeys(("adapters", "optimizer", "adapters_whole", "optimizer_whole", "block_adapters"), 0)
    for rows, cols, copies in adapter_shapes(arch, rank):
        numel, local = rows * cols, adapter_local(rows, cols, world)
        out["adapters"] += local * adapter_bytes * copies
        out["adapters_whole"] += numel * adapter_bytes * copies
        out["block_adapters"] += numel * adapter_bytes
        out["optimizer"] += state_bytes(local, numel, eight_bit) * copies
        out["optimizer_whole"] += state_bytes(numel, numel, eight_bit) * copies
    out["gradients"], out["gradients_whole"] = out["adapters"], out["adapters_whole"]
    return out


def per_rank(config: dict | ModelArch | str, method: str = "qlora", world: int = 1, seq_len: int = 4096,
             batch_size: int = 1, rank: int = 32, gradient_checkpointing: bool = True, offload_base: bool = False,
             constants: MemoryConstants = CUDA_BF16, quant_type: str = "nf4", double_quant: bool = True,
             optimizer: str = "paged_adamw_8bit", adapter_bytes: int = 4, chunked_loss: bool = True,
             keep_base_outputs: bool = False, hqq_group_size: int = 64, residual_bytes: int = 2,
             objective: str = "sft") -> dict[str, int]:
    """Bytes one rank of a `world`-process run holds at its peak, by component (module docstring);
    world=1 is the single-process run. batch_size is the run's micro-batch (sequences; pairs for
    dpo/orpo), of which each rank takes ceil(batch_size / world) rows. Full fine-tuning's trained weights
    count as base, their gradients and state as theirs (sharded the same way)."""
    if int(world) != world or world < 1:
        raise ValueError(f"world must be a positive integer, got {world}")
    if offload_base and method != "qlora":
        raise ValueError(f"offload_base moves a 4-bit base to the host: method must be qlora, got '{method}'")
    arch = as_arch(config)
    rows = max(1, math.ceil(batch_size / world))  # qforge.dist.Group.rows: every world-th row
    # Under FSDP the output layer is an FSDP module, which qforge.train.loss's chunked loss does not
    # recompute from (it needs a plain nn.Linear): several processes take the one-pass loss.
    chunked_loss = chunked_loss and world == 1
    run = dict(seq_len=seq_len, batch_size=rows, rank=rank, gradient_checkpointing=gradient_checkpointing,
               quant_type=quant_type, double_quant=double_quant, optimizer=optimizer, constants=constants,
               keep_base_outputs=keep_base_outputs, adapter_bytes=adapter_bytes, chunked_loss=chunked_loss,
               hqq_group_size=hqq_group_size, residual_bytes=residual_bytes, objective=objective)
    one = plan_run(arch, method, num_gpus=1, **run)  # activations and the transient part, one process
    weights = weight_split(arch, method, world, quant_type, double_quant, hqq_group_size)
    out = {k: weights[k] for k in ("base", "experts", "embeddings")}
    embed, head = vocab_group_bytes(arch, method, constants.compute_bytes, residual_bytes)
    if method != "full":  # the vocabulary matrices in the dtype the run holds them (weight_split: 2 bytes)
        untied = 2 if any(w.name == "lm_head" for w in model_weights(arch)) else 1
        out["embeddings"] += shard(embed + head - untied * 2 * arch.vocab_size * arch.hidden_size, world)
    if method == "full":  # every weight trains: BF16 gradients, AdamW state on its shard
        numels = [(w.numel, w.copies) for w in model_weights(arch)]
        eight_bit = OPTIMIZER_BITS[optimizer] == 8
        out["adapters"] = 0
        out["gradients"] = sum(shard(n, world) * 2 * k for n, k in numels)
        out["optimizer"] = sum(state_bytes(shard(n, world, OPTIM_BLOCK), n, eight_bit) * k for n, k in numels)
        block_grads = 0
    else:
        trained = trained_split(arch, rank, world, optimizer, adapter_bytes)
        out.update({k: trained[k] for k in ("adapters", "gradients", "optimizer")})
        block_grads = trained["block_adapters"]
    out["activations"] = one.activations
    out["buffers"] = one.temporary
    if world > 1:
        block = weights["block"] + block_grads  # a block's 4-bit storage, norms and adapters, gathered
        vocabulary = max(GATHER_COPIES * max(embed, head) + constants.context_bytes, one.temporary + (head or embed))
        out["buffers"] = vocabulary + GATHERED_BLOCKS * block + weights["root"] + block_grads
    if offload_base:  # experts too: the whole 4-bit base is on the host
        out["base"] = resident_base_bytes(arch, weights["base"] + weights["experts"])
        out["experts"] = 0
    out["total"] = sum(out[k] for k in RANK_KEYS)
    return out


def vocab_group_bytes(arch: ModelArch, method: str = "qlora", compute_bytes: int = 2,
                      residual_bytes: int = 2) -> tuple[int, int]:
    """(input embeddings, output layer) whole, in bytes, as the run holds them: floats in the compute
    dtype (qforge.model.load.target_dtype), the embeddings in float32 under a float32 residual stream
    when stored in float32 (load's float32_residual_names); the output layer 0 when tied (one group over both). full: BF16."""
    names = {w.name for w in model_weights(arch)}
    values = arch.vocab_size * arch.hidden_size
    value = 2 if method == "full" else max(2, compute_bytes)
    embed = values * (value if method == "full" or not arch.stored_float32 else max(value, residual_bytes))
    return embed, (values * value if "lm_head" in names else 0)


def resident_base_bytes(arch: ModelArch, base_on_rank: int) -> int:
    """--offload-base: bytes of this rank's base on the device, OFFLOAD_RESIDENT_BLOCKS blocks of it."""
    layers = max(1, arch.num_layers)
    return math.ceil(base_on_rank * min(OFFLOAD_RESIDENT_BLOCKS, layers) / layers)


def offload_host_bytes(config: dict | ModelArch | str, method: str = "qlora", world: int = 1,
                       quant_type: str = "nf4", double_quant: bool = True, hqq_group_size: int = 64) -> int:
    """--offload-base: the pinned host memory one rank holds, its shard of the 4-bit base (experts too)."""
    split = weight_split(as_arch(config), method, world, quant_type, double_quant, hqq_group_size)
    return split["base"] + split["experts"]


def gpus_for(config: dict | ModelArch | str, gpu_bytes: int, max_gpus: int = 256, **run: object) -> int | None:
    """Fewest ranks whose per-rank total fits a device of gpu_bytes; None if none up to max_gpus does."""
    arch = as_arch(config)
    return next((n for n in range(1, max_gpus + 1) if per_rank(arch, world=n, **run)["total"] <= gpu_bytes), None)


__all__ = ["RANK_KEYS", "GATHERED_BLOCKS", "GATHER_COPIES", "vocab_group_bytes", "OFFLOAD_RESIDENT_BLOCKS", "per_rank",
           "offload_host_bytes",
           "weight_split", "trained_split", "state_bytes", "adapter_local", "adapter_shapes", "quantised_split", "shard", "resident_base_bytes", "gpus_for"]

