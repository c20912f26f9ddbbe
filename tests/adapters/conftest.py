"""Tiny random Llama models for the adapter tests (built by tests/fixtures.py): a dense one, its
qforge 4-bit twin, and the plain transformers model holding the twin's dequantised weights (the base PEFT sees)."""
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from qforge.model.surgery import adapted_layers, add_adapter
from qforge.nn import LoraSpec
from qforge.quant import dequantize
from tests.fixtures import quantize_all, tiny_llama

VOCAB = 160


def tiny_dense(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    """A random Llama (hidden 64, 2 layers) over VOCAB tokens, eval mode, initializer_range 0.1."""
    return tiny_llama(vocab=VOCAB, tied=tie, seed=seed, initializer_range=0.1).eval()


def tiny_dense_folder(folder):
    """A dense tiny Llama folder with a word-level tokenizer, as load_model would meet one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_dense().save_pretrained(str(folder))
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))


def quantized_twin(dense: nn.Module) -> nn.Module:
    """A deep copy of `dense` with every linear but lm_head a float32-compute 4-bit AdaptedLinear."""
    return quantize_all(copy.deepcopy(dense)).eval()


def dequantized_base(qmodel: nn.Module, dense: nn.Module) -> nn.Module:
    """A plain transformers model whose Linear weights are qmodel's dequantised 4-bit weights."""
    base = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in adapted_layers(qmodel):
            base.get_submodule(name).weight.copy_(dequantize(layer.base.quant_state, torch.float32))
    return base.eval()


def randomise_adapter(model: nn.Module, name: str = "default", seed: int = 1, std: float = 0.05) -> None:
    """Non-zero B (and a perturbed DoRA magnitude) so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                a = layer.adapters[name]
                a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=gen) * std)
                if a.spec.use_dora:
                    a.magnitude.mul_(1 + 0.1 * torch.randn(a.magnitude.shape, generator=gen))


def qforge_with_adapter(dense, name="default", **spec):
    model = quantized_twin(dense)
    spec = LoraSpec(**{"r": 4, "alpha": 8, "dropout": 0.0, "dtype": torch.float32,
                       "target_modules": ["q_proj", "v_proj", "down_proj"], **spec})
    add_adapter(model, name, spec)
    randomise_adapter(model, name)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
