"""Tiny random Llama checkpoints written with transformers' save_pretrained, and a tiny tokenizer.

Hidden and intermediate sizes are multiples of 64: bitsandbytes' CPU Linear4bit crashes in eval
mode otherwise (DESIGN.md), and we compare against it.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_config(tied=True, bias=False, rope=None, layers=2) -> LlamaConfig:
    extra = {"rope_parameters": rope} if rope else {}
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                       tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, **extra)


def write_tiny(folder, seed=0, dtype=torch.float32, shard=None, **config_kw):
    """A random LlamaForCausalLM saved into `folder` (sharded when `shard`, e.g. "100KB")."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config_kw)).to(dtype)
    with torch.no_grad():  # biases start at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(folder), **kw)
    return folder


def tiny_tokenizer():
    """A word-level fast tokenizer over the model's vocabulary, with a ChatML chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(VOCAB - 5)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=template)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A single-file float32 checkpoint with tied embeddings and a tokenizer."""
    folder = write_tiny(tmp_path_factory.mktemp("tiny"))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture
def token_ids():
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
