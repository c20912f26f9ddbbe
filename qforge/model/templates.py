"""Chat templates: built-in Jinja templates for the families people train, or a Jinja file.

A template is set on the tokenizer (`tokenizer.chat_template`) before the data is tokenised, and
saved with the adapter's tokenizer files, so serving and export render prompts the same way.
The built-ins live in qforge/data/templates/*.jinja; each is prefix-stable (rendering a
conversation's first k turns gives a prefix of rendering all of them), which the assistant-span
labelling in qforge.train.data needs.
"""
from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "data" / "templates"
FAMILIES = ("chatml", "llama3", "gemma", "mistral", "qwen", "phi3")  # each family's own chat format
# plus the formats LLaMA-Factory's template names render (see LLAMAFACTORY)
BUILTIN = FAMILIES + ("mistral_v3", "alpaca", "vicuna", "human_assistant", "empty")
# other spellings: Axolotl's chat_template names and LLaMA-Factory's template names
ALIASES = {
    "llama-3": "llama3", "llama3_1": "llama3", "llama31": "llama3", "llama-3.1": "llama3",
    "gemma2": "gemma", "gemma_2": "gemma",
    "mistral_v1": "mistral", "mistral_v2v3": "mistral", "mistral_v3_tekken": "mistral", "mistral-instruct": "mistral",
    "qwen2": "qwen", "qwen_25": "qwen", "qwen2.5": "qwen", "qwen25": "qwen",
    "phi_3": "phi3", "phi-3": "phi3", "phi": "phi3",
}
# LLaMA-Factory's `template:` names -> the built-in that renders what its data/template.py renders
# (llamafactory 0.9.5; tests/model/test_templates.py holds its renderings as golden strings). Its
# `mistral` puts no space before [/INST] and one before the answer (Mistral v3's spacing), unlike the
# v1 spacing Axolotl's `mistral` names; its `default` is a Human:/Assistant: format.
LLAMAFACTORY = {
    "default": "human_assistant", "empty": "empty", "alpaca": "alpaca", "vicuna": "vicuna",
    "chatml": "chatml", "llama3": "llama3", "qwen": "qwen", "gemma": "gemma", "gemma2": "gemma",
    "mistral": "mistral_v3", "phi": "phi3",
}


def llamafactory_template(name: str) -> str:
    """The built-in for a LLaMA-Factory `template:` name; ValueError for one qforge does not have."""
    key = str(name).lower()
    if key not in LLAMAFACTORY:
        raise ValueError(f"LLaMA-Factory template {name!r}: qforge renders {', '.join(sorted(LLAMAFACTORY))} "
                         "as LLaMA-Factory does (or give a Jinja file with chat_template: FILE)")
    return LLAMAFACTORY[key]


def read_template(name_or_file: str) -> str:
    """The Jinja source of a built-in template (by name or alias) or of a Jinja file."""
    key = ALIASES.get(name_or_file.lower(), name_or_file.lower())
    if key in BUILTIN:
        return (TEMPLATE_DIR / f"{key}.jinja").read_text(encoding="utf-8")
    path = Path(name_or_file).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"chat template file '{path}': cannot read: {exc}") from exc
    raise ValueError(f"chat template {name_or_file!r}: not a built-in ({', '.join(BUILTIN)}) "
                     "and no such Jinja file")


def check_template(source: str, where: str) -> None:
    """Render a two-turn conversation with `source` to catch Jinja errors before any model loads."""
    import jinja2
    env = jinja2.Environment()
    try:
        env.from_string(source).render(messages=[{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}],
                                       add_generation_prompt=False, bos_token="<s>", eos_token="</s>")
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat template {where}: not a usable Jinja template: {exc}") from None


def apply_chat_template(tokenizer, name_or_file: str | None) -> str | None:
    """Set the chosen template on `tokenizer`; returns its source (None when none was chosen)."""
    if not name_or_file:
        return None
    source = read_template(name_or_file)
    tokenizer.chat_template = source
    return source


def saved_template(folder: str | Path) -> str | None:
    """The chat template saved with a folder's tokenizer files (chat_template.jinja, or the
    chat_template of tokenizer_config.json), or None."""
    import json
    folder = Path(folder)
    try:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if (folder / "tokenizer_config.json").is_file():
            template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
            return template if isinstance(template, str) and template else None
    except (OSError, ValueError):
        return None
    return None


# ---- the end of a turn as an end token ------------------------------------------------------
# The token each family's template closes a turn with (ChatML/Qwen, Llama 3, Gemma, Phi-3); the other
# built-ins close the answer with the tokenizer's own eos_token. A model trained on a template stops
# by emitting that token, so the files saved beside it must name it as an end token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
# families whose tokenizer names the end of turn as its eos (Qwen2.5 and SmolLM2's ChatML, Llama 3.1
# Instruct); Gemma and Phi-3 keep <eos> / <|endoftext|> and list the turn's end in generation_config
EOS_IS_END_OF_TURN = ("<|im_end|>", "<|eot_id|>")


def end_of_turn_token(source: str | None) -> str | None:
    """The end-of-turn token a chat template (Jinja source) writes after each turn, or None (the
    template ends answers with eos_token, or with nothing)."""
    if not source:
        return None
    return next((t for t in END_OF_TURN_TOKENS if t in source), None)


def end_of_turn_id(tokenizer, source: str | None = None) -> int | None:
    """The id of the template's end-of-turn token when the tokenizer holds it as one token (a token
    the tokenizer splits into pieces cannot be an end id). `source` defaults to the tokenizer's template."""
    token = end_of_turn_token(source if source is not None else getattr(tokenizer, "chat_template", None))
    if token is None:
        return None
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if ids and ids[0] is not None and ids[0] != unk else None


def end_ids(tokenizer, source: str | None = None, generation_config=None) -> list[int]:
    """Every id generation should stop on: the generation config's eos ids, the tokenizer's eos and
    the template's end of turn, in that order, without repeats."""
    out: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None)
    for i in [*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id,
              end_of_turn_id(tokenizer, source)]:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


def with_end_of_turn(tokenizer, generation_config=None):
    """(tokenizer, generation_config) to save beside a model trained on the tokenizer's chat template:
    copies whose end ids include the template's end of turn (generation_config.eos_token_id a list;
    the tokenizer's eos_token the end of turn for the families that do that). The inputs are not changed
    (training keeps its own eos). Unchanged objects when the template has no separate end of turn."""
    import copy

    from transformers import GenerationConfig

    eot = end_of_turn_id(tokenizer)
    if eot is None or eot == tokenizer.eos_token_id and generation_config is None:
        return tokenizer, generation_config
    gen = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    ids = end_ids(tokenizer, None, gen)
    gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    token = end_of_turn_token(tokenizer.chat_template)
    if token in EOS_IS_END_OF_TURN and tokenizer.eos_token != token:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.eos_token = token
    return tokenizer, gen
