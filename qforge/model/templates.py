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
