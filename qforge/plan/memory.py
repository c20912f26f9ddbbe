"""The memory model of a fine-tuning run: per-component bytes, the plan, the recommendation.

Every figure is in GB = 1e9 bytes. The formulas and the calibrated constants are in the docstrings
below (MemoryConstants: one instance per device kind, CPU_BF16 measured here, CUDA_BF16 from the
QLoRA paper's and bitsandbytes' figures). `qforge plan` (qforge/commands/plan.py) prints it. The
architectures it prices (ModelArch, the parameter tensors) are read by arch.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .arch import ModelArch, as_arch, model_weights, parameter_count
from .units import GB, card_label, format_gb, parse_gpu  # noqa: F401  (re-exported: qforge.plan's names)

METHODS = ("qlora", "lora", "full")
OBJECTIVES = ("sft", "dpo", "orpo")  # TrainConfig.objective: what a row of batch_size is (a sequence or a pair)
QUANT_TYPES = ("nf4", "fp4", "int4", "hqq4", "hqq3", "hqq2")  # 4 bits per weight; HQQ 4, 3.2 (10 in 32), 2
HQQ_GROUP = 64  # values per HQQ scale and zero-point (TrainConfig.hqq_group_size's default)
OPTIMIZER_BITS = {"paged_adamw_8bit": 8, "adamw_8bit": 8, "paged_adamw_32bit": 32, "adamw_torch": 32, "adamw": 32}
HEADROOM = 0.10  # BF16 LoRA is chosen only if it leaves 10% of the card free: the estimate is +-10%
QUANT_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes 4-bit blocks and double-quant blocks
OPTIM_BLOCK, OPTIM_MIN_NUMEL = 256, 4096  # 8-bit optimiser blocks; smaller tensors keep 32-bit state
# qforge's training loss (qforge.train.loss, which this layer does not import): above one chunk of
# rows it computes the head and the loss LOGITS_CHUNK_BYTES of float32 logits at a time, and holds
# LOSS_HIDDEN_BYTES per trained token and hidden unit: the final hidden states it captured (float32,
# the final norm's output) and their gradient, taken chunk by chunk in forward.
LOGITS_CHUNK_BYTES = 32 * 2**20
LOSS_HIDDEN_BYTES = 8
MATRIX_ATTENTION_SCORES = 2 * 1024 * 1024  # qforge.nn.attention.MATH_MAX_SCORES: above it, SDPA
SDPA_LAYER_SCALE_CPU = 0.75


def expert_bytes(arch: ModelArch, double_quant: bool = True) -> int:
    """Bytes of the routed experts in 4 bits: codes (half a byte a weight) and the blockwise
    constants (quant_constant_bytes), quantised per fused tensor; 0 for a dense model."""
    return sum(((w.numel + 1) // 2 + quant_constant_bytes(w.numel, double_quant)) * w.copies
               for w in model_weights(arch) if w.name.startswith("experts."))


# ---------------------------------------------------------------- constants of the memory model

@dataclass(frozen=True)
class MemoryConstants:
    """What the planner assumes about the device and the training code; one instance per device kind.

    Activation coefficients count the tensors one decoder layer saves for backward, per token,
    in elements of the compute dtype (`compute_bytes` each), for transformers' Llama / Mixtral
    code with SDPA/flash attention (no seq^2 term: the kernels keep only a log-sum-exp per row):
      hidden 6   two RMSNorms, each keeping its fp32 upcast input (2 elements' worth) and its
                 bf16 output, the input of the projections that follow
      q 3        rotated q (saved by attention), attention output, its contiguous copy (o_proj input)
      kv 2       rotated k and v (saved by attention)
      mlp 4      gate, silu(gate), up, silu(gate)*up (the down_proj input); per active expert
      moe 2      per active expert: the gathered token copy it reads, its output before weighting
      lora_dropout 1.5 per adapted linear's input: the dropped copy lora_A reads (1) and the mask
                 (1 byte); QLoRA's recipe uses dropout 0.05-0.1. full fine-tuning: the norms'
                 weights train, so each norm also keeps its bf16 normalised input (+2 hidden)
      backward   gradients alive while one layer runs backward: 2 hidden + 3 mlp (grad of the
                 down input, of gate and of up)
    Assumed constants, not measured on a GPU (the counts above are not tuned; these three were chosen,
    within their plausible ranges, so that QLoRA r=32, seq 4096, batch 1 lands inside the public sizing
    table for 8B, 13B, 34B, 70B, Mixtral 8x22B and 405B, which tests/plan/test_plan.py then checks: a
    consistency check, not a validation; they stay assumptions until a GPU run measures them):
      logit_bytes 4    per logit: one fp32 copy for the loss. The loss briefly holds more (bf16
                       logits 2 + fp32 log-softmax 4), but never while a layer is recomputed,
                       and this model adds the two peaks instead of taking the larger one
      context_bytes 1.25 GB  per GPU, outside torch's allocator: the CUDA context (0.5-0.7 GB),
                       cuBLAS workspaces, bitsandbytes' and NCCL's own buffers
      fragmentation 0.40  the caching allocator's slack on what is allocated and freed every
                       step (activations, logits, dequantised weights): blocks of many sizes
                       leave gaps. On that dynamic part only: 4-14% of the sizing table's totals
    A later calibration against measured peaks (e.g. on CPU, where compute_bytes may be 4 and
    there is no CUDA context) makes another instance with `dataclasses.replace`.
    """
    compute_bytes: int = 2
    hidden: float = 6.0
    q: float = 3.0
    kv: float = 2.0
    mlp: float = 4.0
    moe: float = 2.0
    lora_dropout: float = 1.5
    full_norm_extra: float = 2.0
    backward_hidden: float = 2.0
    backward_mlp: float = 3.0
    logit_bytes: float = 4.0
    context_bytes: int = int(1.25 * GB)
    fragmentation: float = 0.40
    sdpa_layer_scale: float = 1.0  # CPU only: see CPU_BF16
    matrix_score_bytes: float = 0.0  # CPU only: see CPU_BF16
    chunk_logit_bytes: float = 0.0  # per logit of qforge's chunked loss; 0: logit_bytes (see CPU_BF16)
    softcap_logit_bytes: float = 0.0  # more per logit when the head's logits are soft-capped (see CPU_BF16)


CUDA_BF16 = MemoryConstants()
# CPU training with bf16 autocast, measured on this repository's trainer: SmolLM2-135M, rank 16,
# paged 8-bit AdamW, qlora and lora at batch 1 x 128 with checkpointing, 1 x 256 without,
# 4 x 128 without and 4 x 256 with (tests/plan/test_plan_measured.py): the peak resident memory
# of a fresh process per setting above its post-import baseline, with glibc's mmap threshold
# fixed at 128 KiB (qforge.eval.bench.MEASURE_ENV), so that the peak is the memory the run holds
# live and is the same every time (with glibc's default heap the same setting read 1270-1701 MB
# across processes: freed heap that stays resident, which depends on thread timing). Checked on
# two runs of the ten settings (this checkout and CI's clean clone, whose peaks read 2-8% higher):
# worst error 8.6% (see matrix_score_bytes). glibc's default heap can hold 10-60% more than this
# on top of the dynamic part; `qforge train`'s fit warning does not add it.
# These runs, and so every constant below, had the BF16 residual stream (--residual-dtype bfloat16).
# The float32 residual (qlora's and lora's default since issue 27) adds no constant: plan_run counts
# what it saves (float32_residual_layer_bytes, float32_residual_score_bytes, a tied head's copy), and
# benchmarks/plan_calibration.py checks both residual dtypes on the FIT set and on the HELD-OUT set
# (BENCHMARKS.md, "The planner for the float32 residual").
# Eight constants differ from CUDA_BF16:
#   lora_dropout 1.0  qforge's dropout keeps no mask (qforge.nn.dropout): only the dropped copy
#   backward_hidden 3.0, backward_mlp 4.5  gradients alive while a layer runs backward: 1.5x the
#                     CUDA counts (fitted; not broken down tensor by tensor)
#   logit_bytes 10    bytes per logit at the peak of the loss (bf16 logits, their float32 copy
#                     and log-softmax; CPU has no fused cross-entropy backward). With a 49k
#                     vocabulary and hidden 576 the logits are most of SmolLM2's dynamic memory.
#   context_bytes 80 MB  no CUDA context; what a CPU run holds beyond the planned tensors (the
#                     model's Python objects, dequantisation workspaces, thread stacks)
#   fragmentation 0.0  nothing: with every tensor-sized block its own mapping there is no slack
#   sdpa_layer_scale  the share of (layer + backward) that one checkpointed layer holds when its
#                     attention runs SDPA (CPU rows with batch*heads*seq^2 > MATRIX_ATTENTION_SCORES,
#                     qforge.nn.attention's limit for its matrix path: long rows). The counts above
#                     were fitted on 128-256-token rows; benchmarks/long_context.py (a 13M Llama
#                     shape, 1k-16k tokens, the chunked loss) put the recomputed layer at about
#                     this share of them. One shape: treat it as a first calibration.
#   matrix_score_bytes 6  bytes per attention score that a layer saves for backward when its rows take
#                     qforge's matrix attention (short rows: batch*heads*seq^2 <= MATRIX_ATTENTION_SCORES):
#                     the float32 softmax output (4) and its BF16 copy that multiplies v (2). Every
#                     layer's without checkpointing, one layer's with it. Before this term the
#                     uncheckpointed 1 x 256 rows (9 heads, 30 layers: 106 MB of scores) read 13-15%
#                     under the measured peak; with it, and context_bytes 80 MB (60 before: set
#                     between the two runs below), the ten settings of tests/plan/test_plan_measured.py
#                     lie within -5.4%..+6.8% of this checkout's peaks and -8.6%..+5.3% of CI's clean
#                     clone's, which read 2-8% higher.
#   chunk_logit_bytes 13.5, softcap_logit_bytes 8.8  the peak of qforge's chunked loss (qforge.train.loss)
#                     per logit of one chunk, measured on the loss alone at SmolLM2's vocabulary and
#                     hidden size (49152 x 576, 1024 rows): 13.5 bytes a logit, 22.3 with Gemma 2's soft cap
#                     (its tanh, the slope t'(z) and their temporaries). Not fitted to any training run.
CPU_BF16 = replace(CUDA_BF16, lora_dropout=1.0, backward_hidden=3.0, backward_mlp=4.5, logit_bytes=10.0,
                   context_bytes=80 * 10**6, fragmentation=0.0, sdpa_layer_scale=SDPA_LAYER_SCALE_CPU,
                   matrix_score_bytes=6.0, chunk_logit_bytes=13.5, softcap_logit_bytes=8.8)


# ---------------------------------------------------------------- per-component bytes

def code_bits(quant_type: str = "nf4") -> float:
    """Bits of one stored code of a quantised linear weight: 4 for nf4/fp4/int4; HQQ's 4, 3.2 (ten
    3-bit codes per int32) or 2 (qforge.quant.hqq.hqq_bits_per_param without its scales and zeros)."""
    if not quant_type.startswith("hqq"):
        return 4.0
    from ..quant.hqq import hqq_bits_per_param, hqq_nbits
    return hqq_bits_per_param(hqq_nbits(quant_type), 1, meta_bits=0)


def bits_per_param(quant_type: str = "nf4", double_quant: bool = True, group_size: int = HQQ_GROUP) -> float:
    """Storage bits per weight of a quantised linear, codes plus constants: NF4 with double
    quantisation ~4.127, without 4.5; HQQ at group size 64 with float16 scales and zeros 4.5, 3.7, 2.5."""
    if quant_type.startswith("hqq"):
        from ..quant.hqq import hqq_bits_per_param, hqq_nbits
        return hqq_bits_per_param(hqq_nbits(quant_type), group_size, meta_bits=16)
    n = QUANT_BLOCK * NESTED_BLOCK * 1024  # large enough for the fixed maps to vanish
    return 4 + 8 * quant_constant_bytes(n, double_quant) / n


def weight_bytes(arch: ModelArch, method: str, quant_type: str = "nf4") -> int:
    """Bytes of the frozen (lora/qlora) or trained (full) model weights.

    qlora: decoder linears as 4-bit codes (0.5 byte/param, odd counts padded to a byte; HQQ:
    code_bits(quant_type) per param, rounded up to a byte);
    embeddings, LM head and router in BF16 (2 bytes); norms in fp32 (4), as k-bit preparation
    leaves them. lora and full: every parameter in BF16.
    """
    if method != "qlora":
        return 2 * parameter_count(arch)
    unquantised_bytes = {"norm": 4, "embedding": 2, "router": 2, "bias": 2}
    total = 0
    bits = code_bits(quant_type)
    for w in model_weights(arch):
        linear = (w.numel + 1) // 2 if bits == 4 else math.ceil(w.numel * bits / 8)
        size = linear if w.kind == "linear" else w.numel * unquantised_bytes[w.kind]
        total += size * w.copies
    return total


def quant_constant_bytes(numel: int, double_quant: bool = True, quant_type: str = "nf4",
                         group_size: int = HQQ_GROUP) -> int:
    """Bytes of bitsandbytes' 4-bit constants for one tensor of `numel` weights (HQQ: a float16
    scale and zero-point per group of `group_size`, 4 bytes a group; double_quant does not apply).

    One absmax per 64-weight block: with double quantisation a uint8 code (1 byte) plus, per 256
    absmax, an fp32 second-level scale (4 bytes), an fp32 offset and the fp32 code maps (16 + 256
    values); about 0.127 bits per weight. Without it, an fp32 absmax per block (0.5 bits/weight).
    """
    if quant_type.startswith("hqq"):
        return 4 * math.ceil(numel / group_size)
    blocks = math.ceil(numel / QUANT_BLOCK)
    if not double_quant:
        return 4 * blocks + 4 * 16
    return blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 4 * 16 + 4 * 256


def adapter_tensors(arch: ModelArch, rank: int) -> list[tuple[int, int]]:
    """(numel, copies) of every LoRA tensor: A is [r, in], B is [out, r], for each adapted matrix."""
    tensors = []
    for w in model_weights(arch):
        for fan_in, fan_out in w.adapted:
            tensors += [(rank * fan_in, w.copies), (rank * fan_out, w.copies)]
    return tensors


def optimizer_bytes(tensors: list[tuple[int, int]], optimizer: str) -> int:
    """Bytes of AdamW's two moments for the trained tensors, given as (numel, copies).

    8-bit (bitsandbytes, paged or not): 1 byte per value per moment plus an fp32 absmax per
    256-value block, for tensors of at least 4096 elements; smaller ones keep 32-bit moments.
    32-bit: 8 bytes per parameter.
    """
    if optimizer not in OPTIMIZER_BITS:
        raise ValueError(f"unknown optimizer '{optimizer}': choose one of {', '.join(OPTIMIZER_BITS)}")
    total = 0
    for numel, copies in tensors:
        if OPTIMIZER_BITS[optimizer] == 8 and numel >= OPTIM_MIN_NUMEL:
            total += copies * (2 * numel + 2 * 4 * math.ceil(numel / OPTIM_BLOCK))
        else:
            total += copies * 8 * numel
    return total


def layer_activation_elems(arch: ModelArch, method: str, rank: int, c: MemoryConstants) -> float:
    """Elements one decoder layer saves for backward, per token (see MemoryConstants).

      hidden*H*(norms per layer)/2 + q*Q + kv*KV + mlp*I_active + MoE: moe*top_k*H
      + LoRA methods: lora_dropout*(5H + Q + I_active) (inputs of q,k,v,gate,up; o; down)
                      + r per adapted matrix (the lora_A outputs)
      + full: full_norm_extra*H
    with H hidden, Q = heads*head_dim, KV = kv_heads*head_dim, I_active = intermediate*top_k.
    """
    h, i_act = arch.hidden_size, arch.active_intermediate
    lora = method in ("lora", "qlora")
    # `hidden` counts two norms (Gemma 2/3 have four), each its float32 input and its bf16 output;
    # `mlp` counts the down projection's input. A frozen linear keeps nothing of its input for
    # backward (its weight takes no gradient): with LoRA neither the norms' outputs nor the down
    # input are kept, only the dropped copies lora_A reads (lora_dropout below). Measured with
    # saved_tensors_hooks on SmolLM2 qlora at the FIT shapes 4 x 128 and 1 x 256 (CPU, no
    # checkpointing): 28.2-29.1 kB a token a layer besides the attention scores, 33.6 kB counted
    # with the norms' outputs and the down input, 28.3 kB without.
    norms = (c.hidden / 2 - (1 if lora else 0)) * arch.norms_per_layer
    elems = norms * h + c.q * arch.q_dim + c.kv * arch.kv_dim + (c.mlp - (1 if lora else 0)) * i_act
    if arch.num_experts:
        elems += c.moe * arch.experts_per_token * h
    if lora:
        elems += c.lora_dropout * (5 * h + arch.q_dim + i_act)
        mlp_matrices = 3 * (arch.experts_per_token if arch.num_experts else 1)
        elems += rank * (4 + mlp_matrices)
    else:
        elems += c.full_norm_extra * h
    return elems


def base_output_elems(arch: ModelArch) -> int:
    """Elements per token of one layer's frozen base products (the outputs of q, k, v, o and of
    the MLP's gate, up and down; each active expert's for MoE): what selective checkpointing keeps
    (qforge.nn.recompute)."""
    experts = arch.experts_per_token if arch.num_experts else 1
    return arch.q_dim + 2 * arch.kv_dim + arch.hidden_size + 2 * arch.active_intermediate + experts * arch.hidden_size


def activation_bytes(arch: ModelArch, method: str, tokens: int, rank: int, gradient_checkpointing: bool,
                     c: MemoryConstants = CUDA_BF16, keep_base_outputs: bool = False, sdpa: bool = False,
                     scores: int = 0) -> int:
    """Bytes of saved activations on one GPU for `tokens` = batch * seq_len tokens.

    With checkpointing: each layer's input hidden state is kept (L * H elements per token) and
    one layer at a time recomputes its full set and runs backward:
        tokens * b * (L*H + layer + backward)
    Without: every layer keeps its full set:  tokens * b * (L*layer + backward)
    where b = compute_bytes, layer = layer_activation_elems, backward = backward_hidden*H +
    backward_mlp*I_active. The logits are counted in temporary_bytes. keep_base_outputs
    (selective checkpointing, lora and qlora) adds every layer's base products: L * base_output_elems.
    sdpa (rows whose attention runs SDPA) scales the recomputed layer's share by c.sdpa_layer_scale.
    scores: attention scores per layer (batch * heads * seq^2) of rows that take the CPU's matrix
    attention; each layer that keeps its activations keeps c.matrix_score_bytes per score.
    """
    layer = layer_activation_elems(arch, method, rank, c)
    backward = c.backward_hidden * arch.hidden_size + c.backward_mlp * arch.active_intermediate
    if gradient_checkpointing:
        per_token = arch.num_layers * arch.hidden_size + (layer + backward) * (c.sdpa_layer_scale if sdpa else 1.0)
        if keep_base_outputs and method in ("lora", "qlora"):
            per_token += arch.num_layers * base_output_elems(arch)
    else:
        per_token = arch.num_layers * layer + backward
    layers_keeping_scores = 1 if gradient_checkpointing else arch.num_layers
    return int(tokens * c.compute_bytes * per_token + layers_keeping_scores * scores * c.matrix_score_bytes)


def temporary_bytes(arch: ModelArch, method: str, tokens: int, activations: int, num_gpus: int,
                    c: MemoryConstants = CUDA_BF16, chunked_loss: bool = False, layer_peak: int = 0,
                    head_copy: int = 0) -> int:
    """Bytes of short-lived buffers and allowances on one GPU.

      dequantised weight (qlora): the largest 4-bit tensor in BF16, 2 bytes * its numel
      logits: tokens * vocab * logit_bytes (the fp32 copy the loss works on); with chunked_loss and
        more tokens than one chunk (loss_rows), the chunk's logits (chunk_logit_bytes each; soft-capped
        logits softcap_logit_bytes more) plus LOSS_HIDDEN_BYTES * hidden
        per token, less `layer_peak` (what a layer's recomputation and backward hold: the loss runs
        before them, so only the larger of the two peaks counts)
      head_copy: what the loss holds beside its logits: a tied head's compute-dtype copy of the
        float32 embeddings under a float32 residual (qforge.train.loss's weight.to(dtype); the
        one-pass loss's autocast cast, saved for the head's backward), compute_bytes * vocab * hidden
      fragmentation * (activations + the buffers above) + context_bytes
    """
    rows = loss_rows(arch, tokens) if chunked_loss else tokens
    per_logit = (c.chunk_logit_bytes or c.logit_bytes) if rows < tokens else c.logit_bytes
    buffers = rows * arch.vocab_size * (per_logit + (c.softcap_logit_bytes if arch.logit_softcap else 0)) + head_copy
    if rows < tokens:
        buffers = max(0, buffers + tokens * arch.hidden_size * LOSS_HIDDEN_BYTES - layer_peak)
    if method == "qlora":
        buffers += 2 * max(w.numel for w in model_weights(arch) if w.kind == "linear")
    return int(buffers + c.fragmentation * (activations + buffers) + c.context_bytes)


def loss_rows(arch: ModelArch, tokens: int) -> int:
    """Rows of logits alive at once in qforge's chunked loss: all `tokens` up to one chunk of
    LOGITS_CHUNK_BYTES of float32 logits, that chunk above."""
    return min(tokens, max(1, LOGITS_CHUNK_BYTES // (4 * arch.vocab_size)))


def recomputed_layer_bytes(arch: ModelArch, method: str, tokens: int, rank: int,
                           c: MemoryConstants = CUDA_BF16, sdpa: bool = False, scores: int = 0) -> int:
    """Bytes one checkpointed layer holds while it is recomputed and runs backward (part of
    activation_bytes): tokens * compute_bytes * (layer + backward), scaled as there, and the
    layer's matrix-attention scores."""
    backward = c.backward_hidden * arch.hidden_size + c.backward_mlp * arch.active_intermediate
    scale = c.sdpa_layer_scale if sdpa else 1.0
    return int(tokens * c.compute_bytes * (layer_activation_elems(arch, method, rank, c) + backward) * scale
               + scores * c.matrix_score_bytes)


def runs_sdpa(arch: ModelArch, batch_size: int, seq_len: int) -> bool:
    """Whether a training row's attention runs SDPA rather than qforge's matrix path on the CPU."""
    return batch_size * arch.num_heads * seq_len * seq_len > MATRIX_ATTENTION_SCORES


def float32_residual_layer_bytes(arch: ModelArch, c: MemoryConstants, residual_bytes: int, sdpa: bool) -> float:
    """Bytes per token that one layer's saved activations gain from a float32 residual stream
    (lora/qlora, qforge.model.surgery.use_float32_residual): residual_bytes - compute_bytes more
    per element (2 over BF16) of the tensors it keeps in the residual dtype, besides its scores:
      (mlp - 1) * I_active  the MLP's saved tensors: gate's and up's outputs (an AdaptedLinear
                            returns its float32 input's dtype) and silu(gate)
      3 * Q                 qforge's matrix attention (rows that do not run SDPA) with float32
                            queries: q, k and v (k and v repeated to the query heads) in float32
                            for its float32 scores (qforge.nn.attention's wide path); SDPA (and
                            every row on CUDA) saves its compute-dtype inputs from either residual
    No new constant. Measured with saved_tensors_hooks on SmolLM2 qlora without checkpointing (CPU),
    float32 against bfloat16 residual: 4 x 128 (matrix attention) +12672 B a token a layer, =
    2 * (3*1536 + 3*576), besides the scores; 1 x 1024 (SDPA) +9216 B, = 2 * 3*1536."""
    wide = max(0, residual_bytes - c.compute_bytes)
    matrix = not sdpa and c.matrix_score_bytes > 0  # the matrix path is the CPU's (CUDA_BF16 has no scores)
    return wide * ((c.mlp - 1) * arch.active_intermediate + (3 * arch.q_dim if matrix else 0))


def float32_residual_score_bytes(c: MemoryConstants, residual_bytes: int) -> float:
    """Bytes per matrix-attention score a layer saves under a float32 residual stream: the float32
    softmax output alone (qforge.nn.attention's wide path multiplies v by it; no compute-dtype copy
    of the probabilities), so c.matrix_score_bytes less compute_bytes. Saved_tensors_hooks, SmolLM2
    4 x 128: one float32 [4, 9, 128, 128] per layer (4 bytes a score) against 6 with a BF16 residual."""
    if residual_bytes > c.compute_bytes and c.matrix_score_bytes:
        return c.matrix_score_bytes - c.compute_bytes
    return c.matrix_score_bytes


def layer_weight_bytes(arch: ModelArch, method: str) -> int:
    """Bytes of one decoder layer's weights as stored (what FSDP all-gathers per layer)."""
    outside = weight_bytes(replace(arch, num_layers=0), method)
    return (weight_bytes(arch, method) - outside) // arch.num_layers


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Bytes of one training run, by component.

    Weights, constants, adapters, gradients and optimiser state are the whole model's (FSDP
    shards them over the GPUs); activations and temporary are one GPU's, for its micro-batch of
    batch_size sequences (temporary without FSDP's gathers). total is their sum, the run's working
    set; per_gpu_total is what each GPU holds: qforge.plan.ranks.per_rank's total (each sharded
    component / num_gpus, activations, temporary, and FSDP's gathered blocks and root group).
    """
    method: str
    num_gpus: int
    base_weights: int
    quant_constants: int
    adapter_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    temporary: int
    total: int
    per_gpu_total: int

    @property
    def sharded(self) -> int:
        """Bytes FSDP splits over the GPUs."""
        return self.base_weights + self.quant_constants + self.adapter_weights + self.gradients + self.optimizer_state

    def fits(self, gpu_bytes: int, headroom: float = 0.0) -> bool:
        """Whether each GPU's share fits a card of gpu_bytes, leaving `headroom` of it free."""
        return self.per_gpu_total <= gpu_bytes * (1.0 - headroom)


def _check_run(method: str, seq_len: int, batch_size: int, rank: int, num_gpus: int, quant_type: str,
               objective: str = "sft") -> None:
    """ValueError for arguments that cannot describe a run."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}': choose one of {', '.join(OBJECTIVES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type '{quant_type}': choose one of {', '.join(QUANT_TYPES)}")
    for label, value in (("seq_len", seq_len), ("batch_size", batch_size), ("rank", rank), ("num_gpus", num_gpus)):
        if int(value) != value or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")


def plan_run(config: dict | ModelArch | str, method: str, seq_len: int = 4096, batch_size: int = 1, rank: int = 32,
             gradient_checkpointing: bool = True, num_gpus: int = 1, quant_type: str = "nf4",
             double_quant: bool = True, optimizer: str = "paged_adamw_8bit",
             constants: MemoryConstants = CUDA_BF16, keep_base_outputs: bool = False,
             adapter_bytes: int = 4, hqq_group_size: int = HQQ_GROUP, chunked_loss: bool = False,
             residual_bytes: int = 2, objective: str = "sft") -> Plan:
    """Memory of fine-tuning `config` with `method` ("qlora", "lora" or "full"), in bytes.

    qlora: 4-bit base (quant_type, with or without double quantisation) + BF16 LoRA adapters of
    `rank` on every decoder linear; lora: the same adapters on a BF16 base; full: every weight
    trained. Adapters take `adapter_bytes` per parameter (4: float32, the default; 2: BF16) and
    their gradients as many (a gradient has its parameter's dtype); full fine-tuning keeps
    BF16 gradients (2). The optimiser is AdamW, 8- or 32-bit (see optimizer_bytes).
    keep_base_outputs: selective checkpointing (see activation_bytes). quant_type hqq4/hqq3/hqq2:
    an HQQ base (code_bits, and scales and zeros per hqq_group_size values). chunked_loss: the loss of
    qforge's trainer (its logits a chunk at a time; see temporary_bytes); False: the one-pass loss
    of transformers and PEFT, which the public sizing table assumes. residual_bytes 4 (lora, qlora
    with a float32 residual stream, qforge.model.surgery.use_float32_residual, `qforge train`'s
    default for them; 2: --residual-dtype bfloat16): the input embeddings in float32 (+2 bytes per
    element; a tied head shares them, an untied one stays as it is), with checkpointing the hidden
    state checkpointed at each layer's input in float32 (+2 bytes per element), the layer tensors
    float32_residual_layer_bytes counts (every layer's without checkpointing, the recomputed one's
    with it), matrix-attention scores at float32_residual_score_bytes, and a tied head's compute-dtype
    copy of the float32 weight while the loss runs (temporary_bytes' head_copy). No constant is
    fitted for it: the counts are of the tensors the code saves (see those functions).

    objective "dpo" or "orpo" (qforge.train.preference): batch_size counts preference PAIRS, and a
    pair is two sequences (chosen and rejected) in one batch, so the training pass is sized for
    2 * batch_size sequences. DPO's reference pass (the same base with the adapters off, or a
    reference adapter) runs under no_grad before it: it keeps no activations and its transient
    peak (one layer's outputs, a chunk of the head's logits) is below the training pass's, so it
    adds nothing here, and no second model is held. ORPO has no reference pass. (full with dpo,
    which qforge does not train, would hold a frozen reference copy: counted in base_weights.)
    """
    _check_run(method, seq_len, batch_size, rank, num_gpus, quant_type, objective)
    arch = as_arch(config)
    rows_asked = batch_size
    if objective != "sft":
        batch_size = 2 * batch_size  # sequences per pass: chosen and rejected together
    tokens = seq_len * batch_size
    base = weight_bytes(arch, method, quant_type if method == "qlora" else "nf4")
    constants_bytes = 0
    if method == "qlora":
        constants_bytes = sum(quant_constant_bytes(w.numel, double_quant, quant_type, hqq_group_size) * w.copies
                              for w in model_weights(arch) if w.kind == "linear")
    if method == "full":
        trained = [(w.numel, w.copies) for w in model_weights(arch)]
        adapters, grads = 0, 2 * parameter_count(arch)
    else:
        trained = adapter_tensors(arch, rank)
        adapter_params = sum(n * k for n, k in trained)
        adapters, grads = adapter_bytes * adapter_params, adapter_bytes * adapter_params
    optim = optimizer_bytes(trained, optimizer)
    sdpa = runs_sdpa(arch, batch_size, seq_len)
    scores = 0 if sdpa else batch_size * arch.num_heads * seq_len * seq_len  # CPU matrix attention's
    wide = method != "full" and residual_bytes > 2  # the float32 residual stream (lora, qlora)
    c = replace(constants, matrix_score_bytes=float32_residual_score_bytes(constants, residual_bytes)) if wide \
        else constants
    acts = activation_bytes(arch, method, tokens, rank, gradient_checkpointing, c, keep_base_outputs, sdpa, scores)
    layer_peak = recomputed_layer_bytes(arch, method, tokens, rank, c, sdpa, scores) if gradient_checkpointing else 0
    head_copy = 0
    if wide:  # the layers' float32 tensors, the float32 embeddings and checkpoints (counted in BF16 above)
        layer_wide = tokens * float32_residual_layer_bytes(arch, c, residual_bytes, sdpa)
        acts += int(layer_wide * (1 if gradient_checkpointing else arch.num_layers))
        if arch.stored_float32:  # the embeddings read in float32 as stored (a 16-bit matrix stays so)
            base += (residual_bytes - 2) * arch.vocab_size * arch.hidden_size
        if gradient_checkpointing:  # each layer's checkpointed input, in float32
            acts += max(0, residual_bytes - c.compute_bytes) * tokens * arch.num_layers * arch.hidden_size
            layer_peak += int(layer_wide)
        if arch.tie_word_embeddings and arch.stored_float32:  # the head's product takes a compute-dtype copy
            # of the float32 weight
            head_copy = c.compute_bytes * arch.vocab_size * arch.hidden_size
    temp = temporary_bytes(arch, method, tokens, acts, num_gpus, c, chunked_loss, layer_peak, head_copy)
    if objective == "dpo" and method == "full":
        base += weight_bytes(arch, "full")  # TRL-style full DPO: a frozen reference copy of the model
    sharded = base + constants_bytes + adapters + grads + optim
    per_gpu = sharded + acts + temp
    if num_gpus > 1:
        from .ranks import per_rank  # ranks builds on this module
        per_gpu = per_rank(arch, method, world=num_gpus, seq_len=seq_len, batch_size=rows_asked, rank=rank, gradient_checkpointing=gradient_checkpointing,
            constants=constants, quant_type=quant_type, double_quant=double_quant, optimizer=optimizer,
            adapter_bytes=adapter_bytes, chunked_loss=chunked_loss, keep_base_outputs=keep_base_outputs,
            hqq_group_size=hqq_group_size, residual_bytes=residual_bytes, objective=objective)["total"]
    return Plan(method=method, num_gpus=num_gpus, base_weights=base, quant_constants=constants_bytes,
                adapter_weights=adapters, gradients=grads, optimizer_state=optim, activations=acts,
                temporary=temp, total=sharded + acts + temp, per_gpu_total=per_gpu)


# ---------------------------------------------------------------- choosing a recipe

def gpus_needed(config: dict | ModelArch | str, gpu_bytes: int, method: str = "qlora", max_gpus: int = 4096,
                **run: object) -> int | None:
    """Fewest GPUs of gpu_bytes that hold `method` sharded with FSDP; None if no count does.

    Only the sharded part shrinks with more GPUs: one GPU's activations and buffers stay, so a
    run whose activations alone exceed the card never fits (shorten seq_len or batch_size).
    """
    arch = as_arch(config)
    for n in (1, 2):  # one GPU has no all-gather buffers; from two on the per-GPU fixed part is constant
        plan = plan_run(arch, method, num_gpus=n, **run)
        if plan.fits(gpu_bytes):
            return n
    fixed = plan.per_gpu_total - math.ceil(plan.sharded / 2)  # activations, buffers, FSDP's gathers
    if fixed >= gpu_bytes:
        return None
    n = max(3, math.ceil(plan.sharded / (gpu_bytes - fixed)))
    while n <= max_gpus and not plan_run(arch, method, num_gpus=n, **run).fits(gpu_bytes):
        n += 1  # ceil rounding of the shard; at most a step or two
    return n if n <= max_gpus else None


def recommend(config: dict | ModelArch | str, gpu_bytes: int, seq_len: int = 4096, batch_size: int = 1,
              rank: int = 32, gradient_checkpointing: bool = True, num_gpus: int = 1, want_full: bool = False,
              **run: object) -> tuple[str, str]:
    """(method, reason): the recipe for `num_gpus` cards of gpu_bytes each.

    The rule, in order:
      1. full, only when asked for (want_full) and it fits;
      2. lora (BF16 base) when it fits leaving HEADROOM (10%) of the card free: no quantisation
         error, and the margin absorbs the estimate's error;
      3. qlora when it fits the card;
      4. fsdp: QLoRA sharded over the fewest GPUs that hold it (named in the reason), or "none"
         when one GPU's activations alone exceed the card.
    Extra keyword arguments (quant_type, double_quant, optimizer, constants) go to plan_run.
    """
    arch = as_arch(config)
    kwargs = dict(seq_len=seq_len, batch_size=batch_size, rank=rank,
                  gradient_checkpointing=gradient_checkpointing, **run)
    plans = {m: plan_run(arch, m, num_gpus=num_gpus, **kwargs) for m in METHODS}
    card, where = card_label(gpu_bytes), f"{num_gpus} x " if num_gpus > 1 else ""
    lora, qlora, full = (plans[m].per_gpu_total for m in ("lora", "qlora", "full"))
    note = ""
    if want_full:
        if plans["full"].fits(gpu_bytes):
            return "full", f"full fine-tuning was asked for and needs {format_gb(full)} of {where}{card}"
        note = f"full fine-tuning needs {format_gb(full)} per GPU, more than {card}; "
    if plans["lora"].fits(gpu_bytes, HEADROOM):
        return "lora", note + (f"BF16 LoRA needs {format_gb(lora)} of {where}{card}, leaving more than "
                               f"{HEADROOM:.0%} free; no quantisation error")
    lora_says = f"BF16 LoRA needs {format_gb(lora)}, more than {1 - HEADROOM:.0%} of {card}"
    if plans["qlora"].fits(gpu_bytes):
        return "qlora", note + f"{lora_says}; QLoRA needs {format_gb(qlora)}"
    n = gpus_needed(arch, gpu_bytes, "qlora", **kwargs)
    if n is None:
        fix = "lower --seq-len or --batch-size" + ("" if gradient_checkpointing else ", or checkpoint gradients")
        return "none", note + (f"QLoRA's activations and buffers alone exceed one {card} card, however many "
                               f"GPUs share the weights; {fix}")
    per_gpu = plan_run(arch, "qlora", num_gpus=n, **kwargs).per_gpu_total
    return "fsdp", note + (f"QLoRA needs {format_gb(qlora)} on {num_gpus} GPU(s), more than {card} each; "
                           f"shard it with FSDP over {n} GPUs of {card} ({format_gb(per_gpu)} each)")
