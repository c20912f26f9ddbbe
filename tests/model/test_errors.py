"""Broken sources give errors that name the file, shard or tensor at fault."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qforge.model.load import load_model

from .conftest import write_tiny


@pytest.fixture
def tiny(tmp_path, tiny_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    return folder


def test_missing_folder_and_files(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model(tmp_path / "nothing.gguf")
    (tiny / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tiny)
    (tmp_path / "config.json").rename(tiny / "config.json")
    (tiny / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tiny)


def test_shard_named_in_the_index_but_absent(tmp_path):
    folder = write_tiny(tmp_path, shard="60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard '{shard}'"):
        load_model(folder)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    folder = write_tiny(tmp_path, shard="60KB")
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    key, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in index["weight_map"].values() if s != shard)
    index["weight_map"][key] = other
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"'{key}' in shard '{other}'"):
        load_model(folder)


@pytest.mark.parametrize("keep", [4, 1000, -100])
def test_truncated_safetensors_file(tiny, keep):
    path = tiny / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # header cut, data cut early, last tensor cut
    with pytest.raises(ValueError, match="model.safetensors.*truncated|truncated.*model.safetensors"):
        load_model(tiny)


def test_missing_tensor_for_a_parameter(tiny):
    for key in ("model.norm.weight", "model.layers.1.mlp.up_proj.weight"):
        tensors = load_file(str(tiny / "model.safetensors"))
        removed = tensors.pop(key)
        save_file(tensors, str(tiny / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"tensor '{key}' is missing"):
            load_model(tiny)
        with pytest.raises(ValueError, match=f"tensor '{key}' is missing"):
            load_model(tiny, quantize=False)
        save_file({**tensors, key: removed}, str(tiny / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_names_the_tensor(tiny):
    tensors = load_file(str(tiny / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(128, 64)
    save_file(tensors, str(tiny / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.o_proj.weight' has shape"):
        load_model(tiny)


def test_a_file_is_not_a_folder(tiny):
    with pytest.raises(ValueError, match="is a file"):
        load_model(tiny / "config.json")


def test_4bit_folder_cannot_load_unquantised(tiny, tmp_path):
    from qforge.model.checkpoint import save_quantized

    model, _ = load_model(tiny)
    save_quantized(model, None, tmp_path / "q4")
    with pytest.raises(ValueError, match="4-bit"):
        load_model(tmp_path / "q4", quantize=False)
