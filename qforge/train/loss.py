"""The training loss of a causal LM, computing logits only where a target exists, a chunk at a time.

transformers' causal-LM loss runs the LM head over every position and then ignores the positions
whose next label is -100 (prompt tokens, padding). With SmolLM2's 49k vocabulary the head is a
fifth of the forward's FLOPs (57 of 271 MFLOP per token), and in chat fine-tuning most positions
are prompt (the demo task: 25k of 62.5k tokens are trained). causal_lm_loss runs the same model
forward with a pre-hook on the output embedding that keeps only the hidden states whose next token
is a target, then takes the mean cross-entropy in float32 over those: the same value as
`model(**batch).loss` (the same rows, fewer of them), with the head's work cut to the trained tokens.

Long rows: the float32 logits of N trained tokens take N x vocab x 4 bytes (16k tokens of Llama 3's
128k vocabulary: 8.4 GB, with the bf16 copy and the softmax about 20 GB), more than the whole
model's activations. Above `chunk_rows_for(vocab)` trained tokens the hook instead captures the
hidden states and ChunkedLinearCrossEntropy computes the head and the loss a chunk of rows at a
time (LOGITS_CHUNK_BYTES of float32 logits each), with the gradients of each chunk taken in the
same pass: nothing of size N x vocab ever exists. Models that transform their logits after the
head (Granite's and Cohere's scale, Gemma's soft-capping) get the same transform, read from the
config and checked against the model's own logits for one row; a model whose logits differ from
that (an unknown transform) or whose head is not a plain nn.Linear takes the one-pass path.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

LOGITS_CHUNK_BYTES = 32 * 2**20  # float32 logits of one chunk: 170 rows of a 49k vocabulary, 65 of 128k


def chunk_rows_for(vocab: int) -> int:
    """Rows per chunk of the chunked loss: LOGITS_CHUNK_BYTES of float32 logits."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(t(h @ W^T + b), y), a chunk of rows at a time; float32 math.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) int64; the product runs in
    `dtype` (autocast's, as the plain head would), the loss in float32; t is z -> cap*tanh(scale*z/cap)
    (cap None: z -> scale*z). With p = softmax(t(z)) and e_y the target's one-hot,
        dL/dz = (p - e_y) * t'(z),  t'(z) = scale * (1 - (t(z)/cap)^2)
        dL/dh = dL/dz @ W,   dL/dW = dL/dz^T @ h,   dL/db = sum over rows of dL/dz
    When a gradient is wanted they are taken in forward, chunk by chunk, while the chunk's logits
    exist (saving them costs as much as saving `hidden` would; recomputing the logits in backward
    would cost one more head product); backward scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, dtype, scale, cap):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                z = _transform(F.linear(h, w, b).float(), scale, cap)          # (c, V) float32
                lse = torch.logsumexp(z, dim=-1)                                 # (c,)
                total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
                if not (want_h or want_w or want_b):
                    continue
                slope = None if cap is None else (1.0 - (z / cap) ** 2) * scale       # t'(z), (c, V)
                g = z.sub_(lse[:, None]).exp_()                                  # softmax, in place
                g[torch.arange(len(y), device=y.device), y] -= 1.0
                if slope is not None:
                    g *= slope
                elif scale != 1.0:
                    g *= scale
                g = g.to(dtype)
                if want_h:
                    grad_h[start:start + chunk] = (g @ w).to(hidden.dtype)
                if want_w:
                    grad_w += (g.t() @ h).float()
                if want_b:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None


def _transform(z: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """The model's logits from its head's output z (float32): scaled, then soft-capped."""
    if scale != 1.0:
        z = z * scale
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return z


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, chunk_rows: int, scale: float = 1.0,
                          cap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of the head nn.Linear(weight, bias) over the rows of hidden (N, H) against
    targets (N,), chunk_rows rows at a time (ChunkedLinearCrossEntropy). The product runs in
    autocast's dtype when autocast is on (as the plain head would), else in the weight's dtype."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    total = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, dtype, scale, cap)
    return total / hidden.shape[0]


def logit_transform(model) -> tuple[float, float | None]:
    """(scale, cap) of what `model` does to its head's output: Cohere's logit_scale (times),
    Granite's logits_scaling (divided by), Gemma's final_logit_softcapping."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    return scale, getattr(config, "final_logit_softcapping", None)


def _plain_head(head) -> bool:
    """A head the chunked loss can recompute from its weight: exactly nn.Linear, plain tensors."""
    return type(head) is nn.Linear and type(head.weight.data) is torch.Tensor and not head.weight.is_meta


def causal_lm_loss(model, batch: dict, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label (shifted by one) is not -100.
    chunk_rows: rows per chunk of the chunked loss (default chunk_rows_for(vocab)); at most that
    many trained tokens take the one-pass path, which chunking would not make smaller."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != -100                                  # (B, T-1): position t predicts t+1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not bool(keep.any()):
        return model(**batch, use_cache=False).loss
    rows = F.pad(keep, (0, 1), value=False)                 # (B, T): the last position predicts nothing
    chunk = chunk_rows or chunk_rows_for(head.weight.shape[0])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if int(keep.sum()) > chunk and _plain_head(head) and getattr(model, "_qforge_chunked_loss", True):
        loss = _chunked_loss(model, head, inputs, rows, targets[keep], chunk)
        if loss is not None:
            return loss
    return _one_pass_loss(model, head, inputs, rows, targets[keep])


def _target_rows(rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dim() != 3 or hidden.shape[:2] != rows.shape:
        raise RuntimeError(f"causal_lm_loss: the output embedding got hidden states of shape "
                           f"{list(hidden.shape)}, expected [batch, seq, hidden] = {list(rows.shape)} + [...]")
    return hidden[rows]                                     # (N, H)


def _one_pass_loss(model, head, inputs: dict, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The head over the N target rows at once: (N, vocab) logits, then the float32 loss."""
    handle = head.register_forward_pre_hook(lambda m, args: (_target_rows(rows, args[0]),) + tuple(args[1:]))
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=0).logits   # (N, vocab)
    finally:
        handle.remove()
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets)


def _chunked_loss(model, head, inputs: dict, rows: torch.Tensor, targets: torch.Tensor, chunk: int):
    """The forward with the head given one target row (the model's own logits for it, to check the
    transform against), the loss from the captured target rows in chunks; None (and the model
    marked for the one-pass path) when the model's logits are not what logit_transform says."""
    captured = {}

    def capture(module, args):
        captured["hidden"] = _target_rows(rows, args[0])
        # detached: the probe is only compared, and its graph would keep the head's compute-dtype copy of
        # a float32 (tied, float32-residual) weight alive beside the loss's own (vocab x hidden x 2 bytes)
        return (captured["hidden"][:1].detach(),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(capture)
    try:
        probe = model(**inputs, use_cache=False, logits_to_keep=0).logits    # (1, vocab)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    scale, cap = logit_transform(model)
    with torch.no_grad():
        ours = _transform(F.linear(hidden[:1].detach(), head.weight, head.bias).float(), scale, cap)
        theirs = probe.detach().float().reshape(ours.shape)
        tol = (1e-4 if probe.dtype == torch.float32 else 2e-2)  # float32 logits: tight; bf16: a few ulps * max(1.0, float(theirs.abs().max()))
        same = bool(torch.allclose(ours, theirs, rtol=0.0, atol=tol))
    if not same:
        warnings.warn(f"causal_lm_loss: {type(model).__name__}'s logits are not its head's output as qforge "
                      "reads its config (an unknown logit transform); using the one-pass loss for it")
        model._qforge_chunked_loss = False
        return None
    return chunked_cross_entropy(hidden, head.weight, head.bias, targets, chunk, scale, cap)
