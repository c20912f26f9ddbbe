"""Tiny random Llama checkpoints written with transformers' save_pretrained, and a tiny tokenizer
(the builders are in tests/fixtures.py)."""
import pytest
import torch

from tests.fixtures import WORD_VOCAB as VOCAB
from tests.fixtures import checkpoint_config as tiny_config  # noqa: F401 (imported by the model tests)
from tests.fixtures import word_tokenizer as tiny_tokenizer
from tests.fixtures import write_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A single-file float32 checkpoint with tied embeddings and a tokenizer."""
    folder = write_tiny(tmp_path_factory.mktemp("tiny"))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture
def token_ids():
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
