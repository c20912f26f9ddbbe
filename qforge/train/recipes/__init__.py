"""Recipes from the tools people come from: qforge's own YAML, Axolotl's and LLaMA-Factory's SFT +
(Q)LoRA configs and their preference-tuning ones (Axolotl `rl: dpo|orpo`, LLaMA-Factory `stage: dpo`),
told apart by their keys and mapped onto TrainConfig (recipes/axolotl.py, recipes/llamafactory.py).

Every key with a meaning here is mapped; keys that only tune the other tool's machinery (caches,
worker counts, logging plots) are accepted and listed as notes; an empty value (`key:` with
nothing after it) means "not set" in both tools and is skipped; every other key is refused by
name, together with what qforge would need instead. `qforge train --config FILE --print-config`
shows the qforge recipe a file became.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import TrainConfig
from .axolotl import AXOLOTL_KEYS, _Axolotl
from .common import Recipe, RecipeError
from .llamafactory import LLAMAFACTORY_KEYS, _LlamaFactory

__all__ = ["Recipe", "RecipeError", "detect_dialect", "load_config", "print_config", "read_recipe", "read_yaml",
           "_Axolotl", "_LlamaFactory"]


def detect_dialect(raw: dict) -> str:
    """'qforge', 'axolotl' or 'llama-factory', by which tool's distinguishing keys the recipe uses."""
    keys = {k.replace("-", "_") for k in raw}
    if keys <= set(TrainConfig.field_names()):
        return "qforge"
    axolotl, factory = len(keys & AXOLOTL_KEYS), len(keys & LLAMAFACTORY_KEYS)
    if max(axolotl, factory) == 0:
        return "qforge"
    return "axolotl" if axolotl >= factory else "llama-factory"


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    except OSError as exc:
        raise FileNotFoundError(f"recipe '{path}': {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def read_recipe(path: str | Path) -> Recipe:
    """Read any supported recipe file into qforge settings (see the module docstring)."""
    path = Path(path)
    raw = read_yaml(path)
    dialect = detect_dialect(raw)
    if dialect == "qforge":
        return Recipe("qforge", {k.replace("-", "_"): v for k, v in raw.items()})
    mapper = _Axolotl(path) if dialect == "axolotl" else _LlamaFactory(path)
    return mapper.run(raw)


def load_config(path: str | Path, overrides: dict | None = None) -> tuple[TrainConfig, Recipe]:
    """(TrainConfig, Recipe) from a recipe file of any dialect; `overrides` (flags given on the
    command line) win over the recipe."""
    recipe = read_recipe(path)
    if recipe.dialect == "qforge":
        return TrainConfig.from_yaml(path, overrides), recipe
    try:
        cfg = TrainConfig(**{**recipe.settings, **(overrides or {})})
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{path} ({recipe.dialect} recipe): {exc}") from None
    return cfg, recipe


def print_config(cfg: TrainConfig, recipe: Recipe, path) -> str:
    """The qforge recipe `path` became, as YAML, with the notes as comments."""
    head = [f"# qforge recipe from {path} ({recipe.dialect})"]
    head += [f"# note: {n}" for n in recipe.notes]
    return "\n".join(head) + "\n" + cfg.to_yaml()
