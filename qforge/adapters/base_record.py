"""What base an adapter was trained on, written beside PEFT's files as `qforge_base.json`.

PEFT reads only adapter_config.json and the weights, so a file of our own beside them leaves
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` untouched. The record is read off the
model itself (its adapted layers' frozen bases), so the trainer, a merge or a server describe a
base the same way:

    {"quant_type": "nf4" | "fp4" | "hqq4" | "hqq3" | "hqq2" | "none",   # "none": dense weights
     "blocksize": 64 | null, "double_quant": true | false | null,      # null for a dense base
     "compute_dtype": "bfloat16"}

A server compares the record of each adapter it registers with its own base (`base_mismatch`):
an adapter served on a base it was not trained on sees other weights than in training.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

BASE_RECORD_NAME = "qforge_base.json"
COMPARED = ("quant_type", "blocksize", "double_quant")  # what changes the base's weights (not the compute dtype)


def describe_base(model: nn.Module) -> dict | None:
    """The record of `model`'s frozen base, from its first adapted layer (None: no adapted layer)."""
    from ..model.surgery import adapted_layers
    from ..nn import DenseBase, Quant4bitBase
    from ..nn.hqq_base import HQQBase
    from ..quant.state import dtype_name

    layer = next((layer for _, layer in adapted_layers(model)), None)
    if layer is None:
        return None
    base, record = layer.base, {"compute_dtype": dtype_name(layer.compute_dtype)}
    if isinstance(base, DenseBase):
        return {"quant_type": "none", "blocksize": None, "double_quant": None, **record}
    if isinstance(base, HQQBase):
        st = base.hqq_state
        return {"quant_type": f"hqq{st.nbits}", "blocksize": st.group_size, "double_quant": False, **record}
    if isinstance(base, Quant4bitBase):
        st = base.quant_state
        return {"quant_type": st.quant_type, "blocksize": st.blocksize, "double_quant": st.nested, **record}
    return {"quant_type": base.kind, "blocksize": None, "double_quant": None, **record}


def write_base_record(folder: Path, record: dict) -> None:
    (Path(folder) / BASE_RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_base_record(folder: Path) -> dict | None:
    """The adapter folder's record, or None when it has none (an adapter PEFT or an older qforge wrote)."""
    path = Path(folder) / BASE_RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"'{BASE_RECORD_NAME}' is not valid JSON") from None
    if not isinstance(record, dict) or "quant_type" not in record:
        raise ValueError(f"'{BASE_RECORD_NAME}' must be an object with a quant_type")
    return record


def base_label(record: dict) -> str:
    """'nf4 (blocksize 64, double quant)', 'dense (bfloat16)': a record in words."""
    if record.get("quant_type") == "none":
        return f"dense ({record.get('compute_dtype', '?')})"
    parts = [f"blocksize {record['blocksize']}"] if record.get("blocksize") else []
    if record.get("double_quant"):
        parts.append("double quant")
    return f"{record['quant_type']}" + (f" ({', '.join(parts)})" if parts else "")


def base_mismatch(trained: dict | None, served: dict | None) -> str | None:
    """A sentence naming both bases when the adapter was trained on another base than the served
    one; None when they agree or either is unknown."""
    if trained is None or served is None:
        return None
    if all(trained.get(k) == served.get(k) for k in COMPARED):
        return None
    return (f"trained on base {base_label(trained)}, served on base {base_label(served)}: its outputs differ "
            "from those it was trained and evaluated with")
