"""Portable adapter files: the base's real name, and a README.md model card beside what we write.

`portable_base_id` turns what a user typed as --base into what other tools can resolve:
"smollm2" (the embedded model) becomes its Hub id, a local folder or file its absolute path, and
anything else (a Hub id) stays as it is. PEFT's AutoPeftModelForCausalLM and llama.cpp's LoRA
converter read adapter_config.json's base_model_name_or_path and look it up.

The model card follows what PEFT's push_to_hub writes: YAML front matter (base_model,
library_name, tags) and a short body; qforge adds the method, data, steps and eval figures when
the run folder around the adapter says them (summary.json, config.yaml).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..model.embedded import SMOLLM2_HUB_ID

SMOLLM2_ALIAS = "smollm2"
CARD_MARKER = "<!-- written by qforge -->"


def portable_base_id(source: str | Path | None) -> str | None:
    """The Hub id or absolute path that stands for base `source` outside qforge."""
    if source is None:
        return None
    text = str(source)
    if text.lower() == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    return text


def _run_facts(adapter_dir: Path | None) -> dict:
    """Method, data, steps and losses from the run folder around an adapter (summary.json and
    config.yaml, which `qforge train` writes), when present."""
    facts: dict = {}
    if adapter_dir is None:
        return facts
    run = Path(adapter_dir).parent
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    try:
        import yaml
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, ValueError, ImportError, AttributeError) as exc:  # noqa: F841 - no config is fine
        config = {}
    if not isinstance(config, dict):
        config = {}
    for label, value in (("training method", summary.get("method") or config.get("method")),
                         ("quantisation", config.get("quant_type")),
                         ("training data", config.get("data")), ("steps", summary.get("steps_done")),
                         ("final training loss", summary.get("final_loss")),
                         ("final eval loss", summary.get("final_eval_loss"))):
        if value is not None:
            facts[label] = round(value, 4) if isinstance(value, float) else value
    return facts


def model_card(base: str | None, adapter_config: dict | None = None, kind: str = "adapter",
               adapter_dir: str | Path | None = None, extra: dict | None = None) -> str:
    """README.md text for an adapter, a merged folder (kind "merged") or a GGUF file (kind "gguf")."""
    library = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind]
    cfg = adapter_config or {}
    tags = ["qforge", "lora"] + (["dora"] if cfg.get("use_dora") else []) + ([kind] if kind != "adapter" else [])
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += [f"library_name: {library}", "tags:"] + [f"- {t}" for t in tags] + ["---", CARD_MARKER, ""]
    title = {"adapter": "LoRA adapter", "merged": "Merged model", "gguf": "GGUF model"}[kind]
    lines += [f"# {title} fine-tuned with qforge", ""]
    if base:
        lines.append(f"- **Base model:** {base}")
    if cfg:
        method = "DoRA" if cfg.get("use_dora") else ("rsLoRA" if cfg.get("use_rslora") else "LoRA")
        lines.append(f"- **Method:** {method} (QLoRA training on a quantised base), r={cfg.get('r')}, "
                     f"alpha={cfg.get('lora_alpha')}, target modules {cfg.get('target_modules')}")
    facts = {**_run_facts(Path(adapter_dir) if adapter_dir else None), **(extra or {})}
    for key, value in facts.items():
        lines.append(f"- **{key[0].upper() + key[1:]}:** {value}")
    if kind == "merged":
        lines += ["", "The adapter is merged into the dequantised base in float32 (qforge merge); load it with "
                  "`AutoModelForCausalLM.from_pretrained`."]
    if kind == "gguf":
        lines += ["", "Run with llama.cpp (`llama-cli -m FILE.gguf`) or Ollama (`ollama create NAME -f Modelfile`)."]
    return "\n".join(lines) + "\n"


def write_card(folder: str | Path, text: str, name: str = "README.md") -> Path | None:
    """Write `text` as folder/name unless a README there was not written by qforge (then None)."""
    path = Path(folder) / name
    if path.exists() and CARD_MARKER not in path.read_text(errors="replace"):
        return None
    from ..fileio import atomic_write_bytes
    return atomic_write_bytes(path, text.encode())
