"""Preference losses: DPO (sigmoid, with label smoothing) and ORPO, on a batch of chosen/rejected pairs.

A preference batch (qforge.train.preference_data.collate_pairs) holds 2B rows padded to one length,
the B chosen sequences first and then the B rejected ones, pair i in rows i and B + i:

    input_ids, attention_mask, labels   int64 [2B, T]; labels are -100 except on completion tokens

Both halves go through the model in ONE forward. Only the positions that predict a wanted token
reach the LM head, a chunk of rows at a time (as qforge.train.loss does for SFT), so the float32
[2B, T, vocab] logits never exist: each chunk's logits are recomputed in backward (activation
checkpointing of the chunk) instead of kept.

DPO (TRL's `loss_type="sigmoid"`; Rafailov et al. 2023; label smoothing as in cDPO):
    pi_c, pi_r   summed completion log-probs of the policy (the model with its adapter)
    ref_c, ref_r the same under the reference: the same model with its adapters off (the 4-bit base
                 itself, no second copy) or with a named reference adapter active; one no-grad pass
    delta = (pi_c - ref_c) - (pi_r - ref_r)
    loss  = mean over pairs of  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)
    rewards/chosen = beta (pi_c - ref_c), rewards/rejected = beta (pi_r - ref_r)
TRL 1.16's "sigmoid" loss has no smoothing term (its `label_smoothing` feeds other loss types); at
eps = 0 the two are the same, and eps > 0 is the conservative DPO of the earlier TRL releases.

ORPO (Hong et al. 2024, TRL's ORPOTrainer; TRL calls lambda `beta`):
    m_c, m_r     MEAN per-token completion log-probs (policy only: no reference)
    log_odds = (m_c - m_r) - (log(1 - exp m_c) - log(1 - exp m_r))
    loss = nll - lambda * mean over pairs of log sigmoid(log_odds)
    nll  = token-mean cross-entropy over the chosen rows: TRL's ORPOTrainer takes every non-padding
           token of the chosen rows, prompt included (orpo_nll="sequence", the default, to match it);
           orpo_nll="completion" takes the completion tokens only, as qforge's SFT trains
    rewards/chosen = lambda m_c, rewards/rejected = lambda m_r
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .loss import chunk_rows_for, logit_transform

IGNORE = -100
METHODS = ("dpo", "orpo")


@dataclass
class PreferenceConfig:
    """The settings preference_step reads (any object with these attributes will do).

    method: "dpo" or "orpo"; beta: DPO's beta, ORPO's lambda; label_smoothing: DPO's eps in [0, 0.5);
    ref_adapter: the adapter whose outputs are DPO's reference (None: every adapter off, the base);
    orpo_nll: "sequence" (TRL's: prompt and completion of the chosen rows) or "completion";
    chunk_rows: positions per chunk of the LM head (None: qforge.train.loss.chunk_rows_for(vocab))."""
    method: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    ref_adapter: str | None = None
    orpo_nll: str = "sequence"
    chunk_rows: int | None = None

    def __post_init__(self):
        check_config(self)


def check_config(cfg) -> None:
    """Raise ValueError for settings preference_step cannot use."""
    if cfg.method not in METHODS:
        raise ValueError(f"preference method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if not cfg.beta > 0:
        raise ValueError(f"beta must be > 0, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.orpo_nll not in ("sequence", "completion"):
        raise ValueError(f"orpo_nll must be 'sequence' or 'completion', got {cfg.orpo_nll!r}")


# ---------------------------------------------------------------------------------------------
# Per-token log-probs, chunked


def _transform(z: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """The model's logits from its head's output z: scaled (Cohere, Granite), then soft-capped (Gemma)."""
    if scale != 1.0:
        z = z * scale
    return z if cap is None else torch.tanh(z / cap) * cap


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, scale: float, cap) -> torch.Tensor:
    """log softmax(t(head(hidden)))[target] in float32: hidden (c, H), targets (c,) -> (c,)."""
    z = _transform(head(hidden).float(), scale, cap)                        # (c, V) float32
    return z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)


def _head_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, scale: float, cap) -> torch.Tensor:
    """_chunk_logps over hidden (N, H), chunk rows at a time; with gradients, each chunk under
    activation checkpointing, so no chunk's (c, vocab) logits outlive its own forward."""
    grad = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        if grad:
            out.append(checkpoint(_chunk_logps, head, h, y, scale, cap, use_reentrant=False))
        else:
            out.append(_chunk_logps(head, h, y, scale, cap))
    return torch.cat(out)


def per_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    chunk_rows: int | None = None) -> torch.Tensor:
    """log p(labels[:, t+1] | tokens <= t) in float32 as a dense [R, T-1] tensor, 0 where the label
    is -100. input_ids, attention_mask, labels: int64 [R, T].

    A pre-hook on the output embedding takes the hidden states of the wanted positions (N of them)
    and hands the model's head one of them, whose logits check the transform this function applies
    (logit_transform); the head then runs over the N rows in chunks of chunk_rows."""
    targets = labels[:, 1:]
    keep = targets != IGNORE                                                # (R, T-1)
    if not bool(keep.any()):
        raise ValueError("no completion token in the batch (every label is -100 after the first position)")
    rows = F.pad(keep, (0, 1), value=False)                                 # (R, T): last predicts nothing
    head = model.get_output_embeddings()
    captured = {}

    def capture(module, args):
        captured["hidden"] = args[0][rows]                                  # (N, H)
        return (captured["hidden"][:1],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(capture)
    try:
        probe = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=0).logits
    finally:
        handle.remove()
    hidden = captured["hidden"]
    scale, cap = logit_transform(model)
    _check_transform(model, head, hidden, probe, scale, cap)
    chunk = chunk_rows or chunk_rows_for(head.weight.shape[0])
    values = _head_logps(head, hidden, targets[keep], chunk, scale, cap)    # (N,) float32
    return torch.zeros(keep.shape, dtype=torch.float32, device=values.device).masked_scatter(keep, values)


def _check_transform(model, head, hidden: torch.Tensor, probe: torch.Tensor, scale: float, cap) -> None:
    """Raise when the model's own logits for one position are not t(head(h)): a logit transform
    logit_transform does not know would make every log-prob wrong."""
    if hidden.shape[0] == 0:
        return
    with torch.no_grad():
        ours = _transform(head(hidden[:1].detach()).float(), scale, cap)
        theirs = probe.detach().float().reshape(ours.shape)
        tol = (1e-4 if probe.dtype == torch.float32 else 2e-2) * max(1.0, float(theirs.abs().max()))
        if not torch.allclose(ours, theirs, rtol=0.0, atol=tol):
            raise RuntimeError(f"{type(model).__name__}: the model's logits are not its head's output as "
                               "qforge reads its config (an unknown logit transform); preference losses need it")


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_logps float32 [R], n_tokens int64 [R]): per row, the summed log-probs of the completion
    tokens (labels != -100, each predicted from the tokens before it) and how many there are."""
    logps = per_token_logps(model, input_ids, attention_mask, labels, chunk_rows)
    return logps.sum(dim=1), (labels[:, 1:] != IGNORE).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# The losses, from log-probs


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's sigmoid loss from summed completion log-probs, each float32 [B] -> (loss, metrics).
    metrics (detached 0-d tensors, TRL's names): rewards/chosen, rewards/rejected (means of
    beta (log pi - log ref)), rewards/accuracies (share of pairs whose chosen reward is higher),
    rewards/margins, logps/chosen, logps/rejected."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)                              # [B]
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    r_c, r_r = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses.mean(), _reward_metrics(r_c, r_r, chosen, rejected)


def _reward_metrics(r_c, r_r, logps_c, logps_r) -> dict[str, torch.Tensor]:
    return {"rewards/chosen": r_c.mean(), "rewards/rejected": r_r.mean(),
            "rewards/accuracies": (r_c > r_r).float().mean(), "rewards/margins": (r_c - r_r).mean(),
            "logps/chosen": logps_c.detach().mean(), "logps/rejected": logps_r.detach().mean()}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation: log1p(-exp x) far from 0, log(-expm1 x) near it
    (the branch at -log 2, Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO's loss from MEAN per-token completion log-probs (float32 [B]) and the chosen NLL (0-d)
    -> (loss, metrics): the reward metrics of dpo_loss with rewards beta * mean log-prob, and
    nll_loss, log_odds_ratio (mean log sigmoid(log odds)), log_odds_chosen (mean log odds)."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)                                          # [B]
    loss = nll - beta * ratio.mean()
    metrics = _reward_metrics(beta * chosen_mean.detach(), beta * rejected_mean.detach(), chosen_mean, rejected_mean)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()})
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Adapters on and off


def _adapter_layers(model):
    """Every module that holds adapters and an `active_adapter` switch (AdaptedLinear, AdaptedExperts)."""
    return [m for m in model.modules() if hasattr(m, "adapters") and hasattr(m, "active_adapter")]


@contextlib.contextmanager
def adapter_active(model, name: str | None):
    """Within the block, adapter `name` is the active one on every adapter layer that has it and
    no adapter is active elsewhere (name None: none anywhere, the base model); afterwards each layer
    has the adapter it had before."""
    layers = _adapter_layers(model)
    if name is not None and not any(name in layer.adapters for layer in layers):
        raise ValueError(f"reference adapter {name!r} is not attached to the model")
    before = [layer.active_adapter for layer in layers]
    try:
        for layer in layers:
            layer.active_adapter = name if name is not None and name in layer.adapters else None
        yield
    finally:
        for layer, active in zip(layers, before):
            layer.active_adapter = active


def reference_logps(model, batch: dict, ref_adapter: str | None = None,
                    chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's summed completion log-probs (chosen [B], rejected [B]), float32, computed once
    under no_grad with the adapters off (or `ref_adapter` active): no activations are kept and no
    second model exists."""
    with torch.no_grad(), adapter_active(model, ref_adapter):
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_rows)
    return logps.chunk(2)


# ---------------------------------------------------------------------------------------------
# One step


def preference_step(model, batch: dict, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one preference batch (see the module docstring) and its metrics as floats
    (loss, rewards/..., logps/..., and for ORPO nll_loss and log_odds_*). The caller runs backward
    on the loss; `cfg`: a PreferenceConfig or any object with its attributes."""
    check_config(cfg)
    if batch["input_ids"].shape[0] % 2:
        raise ValueError(f"a preference batch has an even number of rows (chosen, then rejected), "
                         f"got {batch['input_ids'].shape[0]}")
    loss, metrics = (_dpo_step if cfg.method == "dpo" else _orpo_step)(model, batch, cfg)
    return loss, {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}


def _dpo_step(model, batch: dict, cfg):
    # the reference pass first: its temporaries are gone before the policy's activations pile up
    ref_c, ref_r = reference_logps(model, batch, cfg.ref_adapter, cfg.chunk_rows)
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], cfg.chunk_rows)
    chosen, rejected = logps.chunk(2)
    return dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.label_smoothing)


def _orpo_step(model, batch: dict, cfg):
    """One forward over the union of what ORPO needs: the completion tokens of every row and, with
    orpo_nll="sequence", every non-padding token of the chosen rows."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    half = ids.shape[0] // 2
    wanted = labels
    if cfg.orpo_nll == "sequence":
        nll_labels = ids.masked_fill(mask == 0, IGNORE)[:half]
        wanted = torch.cat([nll_labels, labels[half:]])
    logps = per_token_logps(model, ids, mask, wanted, cfg.chunk_rows)      # (2B, T-1)
    completion = labels[:, 1:] != IGNORE
    means = (logps * completion).sum(1) / completion.sum(1).clamp(min=1)
    nll_mask = wanted[:half, 1:] != IGNORE
    nll = -(logps[:half] * nll_mask).sum() / nll_mask.sum().clamp(min=1)
    chosen, rejected = means.chunk(2)
    return orpo_loss(chosen, rejected, nll, cfg.beta)
