"""Issue 19: every adapter, checkpoint and state file goes through one loader that names a corrupt
file; resume falls back to the newest intact checkpoint and says so; a full disk is named; a row
cut at max_seq_len says so."""
import errno
import json

import pytest
import torch

from qforge.adapters.peft_format import read_adapter_tensors
from qforge.fileio import CorruptFile, DiskFull, atomic_folder, is_disk_full
from qforge.train.checkpoint import read_checkpoint, read_latest_intact, save_checkpoint


def two_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in (1, 2):
        model(torch.randn(3, 8)).sum().backward()
        opt.step()
        save_checkpoint(tmp_path, model, opt, step, {"losses": [1.0] * step})
    return tmp_path / "step-000001", tmp_path / "step-000002"


def test_a_truncated_checkpoint_falls_back_to_the_one_before_and_says_so(tmp_path):
    first, second = two_checkpoints(tmp_path)
    weights = second / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    leftover = tmp_path / ".step-000003.k2j3.tmp"
    leftover.mkdir()
    said = []
    path, contents = read_latest_intact(tmp_path, said.append)
    assert path == first and contents["state"]["step"] == 1
    assert not leftover.exists()
    assert any(str(weights) in line and "step-000002" in line and "falling back" in line for line in said), said
    with pytest.raises(CorruptFile, match="trainable.safetensors' is not a readable safetensors file"):
        read_checkpoint(second)


def test_a_corrupt_state_json_names_the_file(tmp_path):
    _, second = two_checkpoints(tmp_path)
    (second / "state.json").write_text('{"step": 2, "loss')
    with pytest.raises(CorruptFile, match=r"state.json' is not valid JSON .*corrupt or truncated"):
        read_checkpoint(second)
    (second / "optimizer.pt").write_bytes(b"PK\x03\x04 nothing")
    (second / "state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(CorruptFile, match="optimizer.pt' is not a readable torch file"):
        read_checkpoint(second)


def test_no_intact_checkpoint_means_a_fresh_start(tmp_path):
    first, second = two_checkpoints(tmp_path)
    for folder in (first, second):
        (folder / "rng.pt").write_bytes(b"")
    said = []
    assert read_latest_intact(tmp_path, said.append) == (None, None) and len(said) == 2


def test_a_truncated_adapter_names_its_file(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CorruptFile, match="adapter_model.safetensors' is not a readable safetensors file"):
        read_adapter_tensors(folder)


def test_a_full_disk_is_named_and_leaves_nothing_behind(tmp_path):
    def write(tmp):
        (tmp / "half").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match=r"no space left on the device while writing '.*step-000009'"):
        atomic_folder(tmp_path / "step-000009", write)
    assert list(tmp_path.iterdir()) == []
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0 (write)"))
    assert not is_disk_full(RuntimeError("shape mismatch"))


def test_a_row_cut_at_max_seq_len_says_so(tmp_path):
    from qforge.train.data import DataError, build_dataset
    from tests.serve.helpers import smollm2_tokenizer

    path = tmp_path / "long.jsonl"
    row = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="1 row\\(s\\) were truncated at max_seq_len=64"):
        build_dataset(path, smollm2_tokenizer(), max_seq_len=64)
