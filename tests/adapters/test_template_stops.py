"""Templates carry their stop: the tokenizer files written beside an adapter, a merge or a GGUF export
name the chat template's end of turn as an end token, so plain transformers `generate` (and llama.cpp,
Ollama, `qforge serve`) stop at the end of the answer. A script forces the model to emit two answer
tokens, the end of turn, then more tokens: generation from the saved folder must stop at the end of turn,
which it does not when the saved eos ids are the base's."""
import copy

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from qforge.adapters import save_adapter
from qforge.adapters.export_gguf import export_merged_gguf
from qforge.adapters.merge import save_merged
from qforge.commands.export import modelfile_text
from qforge.model.templates import BUILTIN, apply_chat_template, end_ids, end_of_turn_token, with_end_of_turn
from tests.fixtures import quantize_all, random_lora, smollm2_tokenizer, tiny_llama, vocab_of

ENDING = [name for name in BUILTIN if name != "empty"]  # "empty" writes no end at all
BASE_EOS = "<|endoftext|>"
ANSWER = (1000, 2000, 3000)  # ordinary tokens: two of the answer, then one after its end  # a base model's eos (SmolLM2 base), not any template's end of turn


class Script(LogitsProcessor):
    """Forces the next token to be script[k] at the k-th generated position (then the last one)."""

    def __init__(self, prompt_len: int, script: list[int]):
        self.prompt_len, self.script = prompt_len, script

    def __call__(self, input_ids, scores):
        k = min(input_ids.shape[1] - self.prompt_len, len(self.script) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[k]] = 0.0
        return forced


def template_tokenizer(name: str):
    """SmolLM2's tokenizer with a base eos, the template chosen, its end-of-turn token added if missing."""
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.eos_token = BASE_EOS
    apply_chat_template(tok, name)
    token = end_of_turn_token(tok.chat_template)
    if token is not None and token not in tok.get_vocab():
        tok.add_tokens([token], special_tokens=True)
    return tok, token or tok.eos_token


def merged_folder(tmp_path, tok):
    """A tiny QLoRA model over `tok` with a random adapter, merged and saved with the tokenizer; also the
    adapter folder. The model's own generation config holds the base eos only."""
    model = tiny_llama(32, layers=1, tied=False, **vocab_of(tok, "bos", "eos"))
    model.generation_config.eos_token_id = tok.eos_token_id
    quantize_all(model)
    random_lora(model, "ad", seed=1)
    save_adapter(model, tmp_path / "adapter", name="ad", tokenizer=tok)
    return save_merged(model, tok, tmp_path / "merged", name="ad", dtype=torch.float32)


def scripted_generate(model, tok, gen: GenerationConfig, end: int) -> list[int]:
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who is Ada?"}], add_generation_prompt=True,
                                     tokenize=False) or "Who is Ada?"
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    a, b, after = ANSWER
    script = LogitsProcessorList([Script(ids.shape[1], [a, b, end, after, after])])
    out = model.generate(ids, generation_config=gen, logits_processor=script, max_new_tokens=5, do_sample=False,
                         pad_token_id=end)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ENDING)
def test_generate_from_the_saved_folders_stops_at_the_turns_end(tmp_path, name):
    tok, end_token = template_tokenizer(name)
    end = tok.convert_tokens_to_ids(end_token)
    folder = merged_folder(tmp_path, tok)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    saved_tok = AutoTokenizer.from_pretrained(str(folder))
    gen = GenerationConfig.from_pretrained(str(folder))
    assert end in end_ids(saved_tok, None, gen) and tok.convert_tokens_to_ids(BASE_EOS) in end_ids(saved_tok, None, gen)
    a, b, _ = ANSWER
    assert scripted_generate(model, saved_tok, gen, end) == [a, b, end]
    # the adapter folder's files say the same (a user generating with them on the base + adapter)
    assert GenerationConfig.from_pretrained(str(tmp_path / "adapter")).eos_token_id == gen.eos_token_id
    assert AutoTokenizer.from_pretrained(str(tmp_path / "adapter")).eos_token == saved_tok.eos_token
    assert scripted_generate(model, saved_tok, GenerationConfig.from_pretrained(str(tmp_path / "adapter")),
                             end) == [a, b, end]
    # ChatML and Llama 3 name the end of turn as the tokenizer's eos, as Qwen2.5 and Llama 3.1 Instruct do
    assert saved_tok.eos_token == (end_token if end_token in ("<|im_end|>", "<|eot_id|>") else BASE_EOS)


def test_the_base_eos_alone_runs_past_the_turns_end(tmp_path):
    """The check above can fail: with the base's eos only, generation runs past <end_of_turn>."""
    tok, end_token = template_tokenizer("gemma")
    folder = merged_folder(tmp_path, tok)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    end = tok.convert_tokens_to_ids(end_token)
    out = scripted_generate(model, tok, GenerationConfig(eos_token_id=tok.eos_token_id), end)
    assert len(out) == 5 and out[2] == end


def test_saving_leaves_the_training_tokenizer_alone():
    tok, end_token = template_tokenizer("chatml")
    saved, gen = with_end_of_turn(tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    assert tok.eos_token == BASE_EOS and saved.eos_token == end_token
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids(end_token)]
    empty, _ = template_tokenizer("empty")
    assert with_end_of_turn(empty, None) == (empty, None)


def test_gguf_metadata_and_modelfile_stop_on_the_turns_end(tmp_path):
    tok, end_token = template_tokenizer("chatml")  # <|im_end|> is in SmolLM2's vocabulary: a byte-level BPE GGUF
    model = tiny_llama(32, layers=1, tied=True, **vocab_of(tok, "bos", "eos"))
    quantize_all(model)
    random_lora(model, "ad", seed=1)
    gemma = tok.chat_template.replace("<|im_end|>", "<end_of_turn>")  # a template whose end is another token
    path = export_merged_gguf(model, tok, tmp_path / "m.gguf", name="ad", chat_template=tok.chat_template)
    fields = gguf.GGUFReader(str(path)).fields
    end = tok.convert_tokens_to_ids(end_token)
    assert int(fields["tokenizer.ggml.eot_token_id"].contents()) == end
    assert int(fields["tokenizer.ggml.eos_token_id"].contents()) == end    # ChatML: the eos too
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert back.eos_token == end_token and back.chat_template == tok.chat_template
    text = modelfile_text("m.gguf", gemma, BASE_EOS)
    assert 'PARAMETER stop "<end_of_turn>"' in text and f'PARAMETER stop "{BASE_EOS}"' in text
    assert 'PARAMETER stop "<|im_end|>"' in modelfile_text("m.gguf", tok.chat_template, BASE_EOS)
