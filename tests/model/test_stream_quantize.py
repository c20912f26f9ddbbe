"""quantize_folder (what `qforge quantize` runs on a model folder) writes save_quantized's folder
tensor for tensor without holding the model: one shard of output at a time."""
import json

import pytest
import torch
from safetensors import safe_open

from qforge.model.checkpoint import INDEX_NAME, WEIGHTS_NAME, save_quantized
from qforge.model.load import load_model
from qforge.model.stream_quantize import quantize_folder

from .conftest import tiny_tokenizer, write_tiny


def stored(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("tied, bias, shard_bytes", [(True, False, 10**9), (False, True, 30_000)],
                         ids=["tied-one-file", "untied-bias-sharded"])
def test_streamed_folder_equals_save_quantized(tmp_path, tied, bias, shard_bytes):
    source = write_tiny(tmp_path / "src", dtype=torch.bfloat16, tied=tied, bias=bias)
    tiny_tokenizer().save_pretrained(str(source))
    quant = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    summary = quantize_folder(source, tmp_path / "streamed", quant, torch.bfloat16, shard_bytes=shard_bytes)
    assert summary["layers"] == 14 and 0 < summary["packed_bytes"] < summary["dense_bytes"] / 3
    model, tok = load_model(source, compute_dtype=torch.bfloat16)
    save_quantized(model, tok, tmp_path / "whole")

    ours, theirs = stored(tmp_path / "streamed"), stored(tmp_path / "whole")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    config = lambda name: json.loads((tmp_path / name / "config.json").read_text())  # noqa: E731
    assert config("streamed") == config("whole")
    sharded = shard_bytes < 10**6
    assert (tmp_path / "streamed" / INDEX_NAME).is_file() == sharded
    assert (tmp_path / "streamed" / WEIGHTS_NAME).is_file() == (not sharded)
    assert (tmp_path / "streamed" / "tokenizer.json").is_file()

    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    again, _ = load_model(tmp_path / "streamed", compute_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_an_already_quantised_folder_is_refused(tmp_path):
    source = write_tiny(tmp_path / "src")
    quant = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    quantize_folder(source, tmp_path / "q4", quant, torch.float32)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_folder(tmp_path / "q4", tmp_path / "again", quant, torch.float32)
