"""Selective gradient checkpointing: keep the frozen base products, recompute the rest.

Full (non-reentrant) checkpointing keeps each decoder layer's input and, in backward, runs the
layer's forward again to rebuild what its backward needs. For a QLoRA layer most of that rerun is
the base products: dequantise every 4-bit weight and multiply, the same work as the first forward.
Their outputs are cheap to keep (sum of the layer's out_features x 2 bytes per token, e.g. 9 KB per
token per SmolLM2 layer) next to what they cost to rebuild (a dequantisation and a GEMM each).

`keep_base_outputs()` is a `context_fn` for torch.utils.checkpoint: while a checkpointed layer runs
forward, every base product (FrozenBase.product) appends its output to the
layer's tape; when backward recomputes the layer, the base products take their outputs from the
tape in the same order instead of computing them. Norms, attention, the activation function, the
dropout and the low-rank products are recomputed as before, so the memory cost is only the tape.

A replayed entry must match the layer, the input dtype and the expected shape and must not have been
modified in place since it was recorded (its version counter); otherwise the tape is dropped and
the rest of the recomputation computes as usual, so a mismatch costs time, never correctness.
"""
from __future__ import annotations

import threading
from collections import deque

import torch

_local = threading.local()


class _Tape:
    __slots__ = ("entries", "replaying", "keeps")

    def __init__(self, keeps: bool = True):
        self.keeps = keeps  # False: full recomputation, the tape only marks "inside a checkpoint"
        self.entries: deque = deque()
        self.replaying = False


def _current() -> _Tape | None:
    return getattr(_local, "tape", None)


class _Using:
    """Makes `tape` current (recording or replaying) while entered. A class, not a generator
    context: torch enters the same recompute context again for every recomputation of the layer
    (a second backward through a retained graph, autograd.grad then backward)."""

    def __init__(self, tape: _Tape, replaying: bool):
        self.tape, self.replaying, self.previous = tape, replaying, []

    def __enter__(self):
        self.previous.append(_current())
        _local.tape = self.tape
        self.tape.replaying = self.replaying
        return self

    def __exit__(self, *exc):
        _local.tape = self.previous.pop()
        return False


def keep_base_outputs():
    """The (forward, recompute) context managers of one checkpointed call: pass this function as
    torch.utils.checkpoint's `context_fn` (transformers: gradient_checkpointing_kwargs)."""
    tape = _Tape()
    return _Using(tape, replaying=False), _Using(tape, replaying=True)


def recompute_everything():
    """The context_fn of full checkpointing: nothing is kept, but layers can tell that they run
    inside a checkpoint that recomputes them (full_recomputation()) and order their work for it."""
    tape = _Tape(keeps=False)
    return _Using(tape, replaying=False), _Using(tape, replaying=True)


def keeping() -> bool:
    """True inside a selectively checkpointed layer (its base products are recorded or replayed)."""
    tape = _current()
    return tape is not None and tape.keeps


def full_recomputation() -> bool:
    """True inside a layer checkpointed with recompute_everything: its base products will be
    computed again in backward, so the layer should compute them last (torch's early stop then
    skips the last one; see AdaptedLinear.forward)."""
    tape = _current()
    return tape is not None and not tape.keeps


def base_product(key: object, x: torch.Tensor, out_features: int, compute):
    """compute() -> x's base product, or, inside a recomputation, the output recorded for it.

    Called from the forward of the base product's autograd Function (so its backward, dL/dx, runs
    either way). key identifies the layer (its module); out_features is the product's last dimension. Outside a checkpointed layer: compute()."""
    tape = _current()
    if tape is None or not tape.keeps:
        return compute()
    if not tape.replaying:
        out = compute()
        # detached: the tape must not hold the autograd node that forward's caller attaches to
        # `out` (the node -> checkpoint frame -> tape cycle would outlive backward)
        tape.entries.append((key, out.detach(), out._version, x.dtype))
        return out
    if tape.entries:
        k, out, version, x_dtype = tape.entries.popleft()
        # the output's dtype follows from x's and the autocast state, which checkpointing restores
        if k is key and out._version == version and x.dtype == x_dtype and out.shape == (*x.shape[:-1], out_features):
            return out
        tape.entries.clear()  # out of step with the forward: compute everything from here on
    return compute()
