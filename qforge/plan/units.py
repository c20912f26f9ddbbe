"""Units of the planner's figures: GB = 1e9 bytes, GPU sizes as users write them, and their labels."""
from __future__ import annotations

import re

GB = 10**9  # every figure printed or tested is in GB = 1e9 bytes

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_gpu(text: str | int) -> int:
    """Bytes of GPU memory from '24GB' (1e9 bytes), '24GiB' (2**30), '80G' (= GB), '141 GB' or bytes.

    Cards sold as "24 GB" hold 24 GiB, so reading GB as 1e9 leaves ~7% to spare. ValueError for
    anything else, for zero, and for a bare number under 1 MiB (surely a forgotten unit).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(i?)b?|(b))?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"bad GPU memory '{text}': write e.g. 24GB, 80GiB, 80G or a number of bytes")
    number, prefix, binary, _ = match.groups()
    prefix = (prefix or "").lower()
    scale = 1024 ** ("kmgt".index(prefix) + 1) if binary else _UNITS[prefix]
    value = float(number) * scale
    if not prefix and "." in number:
        raise ValueError(f"bad GPU memory '{text}': a number of bytes must be whole")
    if value < 2**20:
        raise ValueError(f"GPU memory '{text}' is under 1 MiB: give a unit, e.g. {number}GB")
    return int(value)


def format_gb(nbytes: float) -> str:
    """'12.34 GB' (1e9 bytes), two decimals below 100 GB, one above."""
    value = nbytes / GB
    return f"{value:.2f} GB" if value < 100 else f"{value:.1f} GB"


def card_label(gpu_bytes: int) -> str:
    """'24 GB', '80 GiB' or '25.5 GB': the card size as the user most likely wrote it."""
    for unit, name in ((GB, "GB"), (2**30, "GiB")):
        if gpu_bytes % unit == 0:
            return f"{gpu_bytes // unit} {name}"
    return f"{gpu_bytes / GB:.1f} GB"

