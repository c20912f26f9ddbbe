"""Built-in chat templates and --chat-template on a tokenizer that has none."""
import pytest

from qforge.train.data import DataError, chat_segments, tokenize_example
from qforge.model.templates import BUILTIN, apply_chat_template, read_template

CONVERSATION = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"}]
GOLDEN = {  # each family's own format for CONVERSATION (bos <s>, eos </s>)
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
              "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    "qwen": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
    "gemma": "<s><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
             "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
    "mistral": "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>",
    "phi3": "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n"
            "<|assistant|>\nA2<|end|>\n",
}


@pytest.fixture
def bare_tokenizer():
    """The tiny word-level tokenizer with its chat template removed."""
    from tests.model.conftest import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_templates_render_their_family_and_are_prefix_stable(name, bare_tokenizer):
    apply_chat_template(bare_tokenizer, name)
    text = bare_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == GOLDEN[name]
    pieces = chat_segments(CONVERSATION, bare_tokenizer)  # raises if a template rewrites earlier turns
    assert "".join(p for p, _ in pieces) == text
    targets = [p for p, is_target in pieces if is_target]
    assert [t.startswith("A1") for t in targets] == [True, False] and targets[1].startswith("A2")


def test_qwen_adds_its_default_system_turn(bare_tokenizer):
    apply_chat_template(bare_tokenizer, "qwen_25")  # Axolotl's name for it
    text = bare_tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_a_jinja_file_and_bad_names(tmp_path, bare_tokenizer):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert apply_chat_template(bare_tokenizer, str(path)) == path.read_text()
    assert bare_tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False) == "[user] U1\n[assistant] A1\n"
    with pytest.raises(ValueError, match=r"chat template 'vicuna': not a built-in \(chatml, llama3"):
        read_template("vicuna")


def test_gguf_tokenizer_without_a_template_trains_with_chat_template_option():
    """SmolLM2's GGUF carries ChatML (plus a default system turn); with its template removed, chat rows
    are refused, and --chat-template chatml gives the very labels its own template gave."""
    from tests.train.test_data import load_tokenizer
    original = load_tokenizer()
    row = {"messages": CONVERSATION}  # with a system turn, SmolLM2's template is plain ChatML
    expected = tokenize_example(row, original, "chat", 256)
    saved = original.chat_template
    try:
        original.chat_template = None
        with pytest.raises(DataError, match="no chat template; set one with --chat-template"):
            tokenize_example(row, original, "chat", 256)
        apply_chat_template(original, "chatml")
        assert tokenize_example(row, original, "chat", 256) == expected
    finally:
        original.chat_template = saved
