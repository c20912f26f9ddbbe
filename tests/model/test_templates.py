"""Built-in chat templates and --chat-template on a tokenizer that has none."""
import pytest

from qforge.train.data import DataError, chat_segments, tokenize_example
from qforge.model.templates import BUILTIN, LLAMAFACTORY, apply_chat_template, llamafactory_template, read_template

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
    "mistral_v3": "<s>[INST] S\n\nU1[/INST] A1</s>[INST] U2[/INST] A2</s>",
    "alpaca": "S### Instruction:\nU1\n\n### Response:\nA1</s>\n\n### Instruction:\nU2\n\n### Response:\nA2</s>\n\n",
    "vicuna": "SUSER: U1 ASSISTANT:A1</s>USER: U2 ASSISTANT:A2</s>",
    "human_assistant": "System: S</s>\nHuman: U1</s>\nAssistant:A1</s>\nHuman: U2</s>\nAssistant:A2</s>\n",
    "empty": "SU1A1U2A2",
}

# What LLaMA-Factory renders for CONVERSATION under each `template:` name, written out by hand from
# the format strings of llamafactory 0.9.5's data/template.py (register_template(name=...):
# format_prefix + format_system on the first turn, then format_user / format_assistant per turn; the
# Llama2Template ones, gemma and mistral, put the system text inside the first user turn), with
# bos_token <s> and eos_token </s>. Checked against that package's own Template._encode.
LLAMAFACTORY_GOLDEN = {
    # format_system "System: {{content}}" eos "\n"; format_user "Human: {{content}}" eos "\nAssistant:";
    # format_assistant "{{content}}" eos "\n"
    "default": "System: S</s>\nHuman: U1</s>\nAssistant:A1</s>\nHuman: U2</s>\nAssistant:A2</s>\n",
    # format_assistant "{{content}}"; user and system default to "{{content}}"
    "empty": "SU1A1U2A2",
    # format_user "### Instruction:\n{{content}}\n\n### Response:\n"; format_assistant "{{content}}" eos "\n\n";
    # system through the default "{{content}}" formatter (no separator of its own)
    "alpaca": "S### Instruction:\nU1\n\n### Response:\nA1</s>\n\n### Instruction:\nU2\n\n### Response:\nA2</s>\n\n",
    # format_user "USER: {{content}} ASSISTANT:"; assistant "{{content}}" eos; system "{{content}}"
    "vicuna": "SUSER: U1 ASSISTANT:A1</s>USER: U2 ASSISTANT:A2</s>",
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
              "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    "qwen": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    # format_prefix bos; system "<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
    # Llama2Template: format_system "{{content}}\n\n" inside the first format_user
    "gemma": "<s><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
             "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
    "gemma2": "<s><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
              "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
    # Llama2Template: format_user "[INST] {{content}}[/INST]", format_assistant " {{content}}" eos
    "mistral": "<s>[INST] S\n\nU1[/INST] A1</s>[INST] U2[/INST] A2</s>",
    "phi": "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n"
           "<|assistant|>\nA2<|end|>\n",
}
# LLaMA-Factory's default_system, used when a conversation has none (same source)
LLAMAFACTORY_DEFAULT_SYSTEM = {
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nU1\n\n### Response:\nA1</s>\n\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.USER: U1 ASSISTANT:A1</s>",
    "default": "Human: U1</s>\nAssistant:A1</s>\n",
    "empty": "U1A1",
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
    assert [t.lstrip().startswith("A1") for t in targets] == [True, False] and targets[1].lstrip().startswith("A2")


@pytest.mark.parametrize("name", sorted(LLAMAFACTORY))
def test_llamafactory_template_names_render_what_llamafactory_renders(name, bare_tokenizer):
    apply_chat_template(bare_tokenizer, llamafactory_template(name))
    assert bare_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == LLAMAFACTORY_GOLDEN[name]
    # LLaMA-Factory's user turn ends with the assistant's header: a generation prompt follows it as is
    prompt = bare_tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert LLAMAFACTORY_GOLDEN[name].startswith(prompt)
    pieces = chat_segments(CONVERSATION, bare_tokenizer)
    targets = [p for p, is_target in pieces if is_target]
    assert [t.lstrip()[:2] for t in targets] == ["A1", "A2"]


@pytest.mark.parametrize("name", sorted(LLAMAFACTORY_DEFAULT_SYSTEM))
def test_llamafactory_default_system_and_no_system(name, bare_tokenizer):
    apply_chat_template(bare_tokenizer, llamafactory_template(name))
    assert bare_tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False) == LLAMAFACTORY_DEFAULT_SYSTEM[name]


def test_unknown_llamafactory_template_is_refused_with_the_names():
    with pytest.raises(ValueError, match=r"LLaMA-Factory template 'zephyr': qforge renders alpaca, chatml, default"):
        llamafactory_template("zephyr")


def test_qwen_adds_its_default_system_turn(bare_tokenizer):
    apply_chat_template(bare_tokenizer, "qwen_25")  # Axolotl's name for it
    text = bare_tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_a_jinja_file_and_bad_names(tmp_path, bare_tokenizer):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert apply_chat_template(bare_tokenizer, str(path)) == path.read_text()
    assert bare_tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False) == "[user] U1\n[assistant] A1\n"
    with pytest.raises(ValueError, match=r"chat template 'zephyr': not a built-in \(chatml, llama3"):
        read_template("zephyr")


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
