"""Hub ids resolve through the Hugging Face cache as transformers finds them: models--ORG--NAME/refs/<rev>
names a commit, snapshots/<commit>/ holds the files. The tests fill a cache folder themselves; nothing
is downloaded (HF_HUB_OFFLINE=1)."""
import shutil

import pytest
import torch

from qforge.model.hub import looks_like_hub_id, resolve_model_id
from qforge.model.load import load_model

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, tiny_dir, monkeypatch):
    """A Hub cache holding tinyorg/tiny-llama at main (the tiny checkpoint) and at tag v1 (another seed)."""
    from tests.model.conftest import tiny_tokenizer, write_tiny

    repo = tmp_path / "hub" / "models--tinyorg--tiny-llama"
    shutil.copytree(tiny_dir, repo / "snapshots" / MAIN)
    write_tiny(repo / "snapshots" / V1, seed=1)
    tiny_tokenizer().save_pretrained(str(repo / "snapshots" / V1))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_hub_id_resolves_to_its_cached_snapshot(hub_cache):
    assert resolve_model_id("tinyorg/tiny-llama") == hub_cache / "snapshots" / MAIN
    assert resolve_model_id("tinyorg/tiny-llama", revision="v1") == hub_cache / "snapshots" / V1
    assert resolve_model_id("tinyorg/tiny-llama", revision=V1) == hub_cache / "snapshots" / V1


def test_load_model_takes_a_hub_id_and_a_revision(hub_cache, tiny_dir):
    by_id, tok = load_model("tinyorg/tiny-llama", compute_dtype=torch.float32, quantize=False)
    by_path, _ = load_model(str(tiny_dir), compute_dtype=torch.float32, quantize=False)
    at_v1, _ = load_model("tinyorg/tiny-llama", compute_dtype=torch.float32, quantize=False, revision="v1")
    name = "model.layers.0.mlp.down_proj.weight"
    weights = [dict(m.named_parameters())[name] for m in (by_id, by_path, at_v1)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert tok is not None and tok.chat_template


def test_missing_model_offline_is_one_line(hub_cache):
    with pytest.raises(FileNotFoundError) as err:
        load_model("tinyorg/not-there", quantize=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model 'tinyorg/not-there' is not in the Hugging Face cache (")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message
    with pytest.raises(FileNotFoundError, match="at revision 'v9'"):
        resolve_model_id("tinyorg/tiny-llama", revision="v9")


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not looks_like_hub_id("org/name")  # a folder here
    assert not looks_like_hub_id("org/model.gguf") and not looks_like_hub_id("smollm2")
    assert not looks_like_hub_id("/abs/path") and not looks_like_hub_id("a/b/c")


def test_cached_model_is_used_without_a_download_when_online(hub_cache, monkeypatch):
    import huggingface_hub
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_id("tinyorg/tiny-llama") == hub_cache / "snapshots" / MAIN
    assert calls == [True]


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "model 'org/gated' is gated: accept its terms on https://huggingface.co/org/gated"),
    ("RepositoryNotFoundError", "model 'org/gated' not found: no such folder here and no such model on the"),
    ("RevisionNotFoundError", "model 'org/gated' has no revision 'None' on the Hub"),
])
def test_hub_errors_are_one_line(hub_cache, monkeypatch, error, message):
    import huggingface_hub
    import huggingface_hub.errors as errors
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        cls = getattr(errors, error)
        raise cls.__new__(cls)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        resolve_model_id("org/gated")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
