import pytest

from .helpers import tiny_model_folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random Llama folder named 'tiny' (so its model name is 'tiny') with SmolLM2's tokenizer."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny")
