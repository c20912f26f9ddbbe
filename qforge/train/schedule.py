"""The learning-rate schedule: linear warmup, then cosine (or linear, or no) decay to a floor."""
import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float,
          kind: str = "cosine") -> float:
    """Learning rate for optimiser step `step` (0-based) of `total_steps`.

    Warmup rises linearly from base_lr/warmup to base_lr over `warmup_steps`; then a half cosine
    falls from base_lr to base_lr * min_lr_ratio at the last step (kind="linear": a straight line
    to that floor; kind="constant": base_lr throughout).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    if kind == "constant":
        return base_lr
    if kind == "linear":
        return base_lr + (floor - base_lr) * progress
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
