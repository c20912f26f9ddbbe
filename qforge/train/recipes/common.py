"""What the recipe dialects share: the error, the Recipe, the converters from a recipe value to a
TrainConfig value, and the table-driven mapper each dialect fills in (recipes/axolotl.py,
recipes/llamafactory.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

OPTIMIZERS = {  # both tools' optimiser names -> qforge's
    "paged_adamw_8bit": "paged_adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit",
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "paged_adamw_32bit": "adamw", "adamw_torch_4bit": "adamw_8bit",
}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
              "constant_with_warmup": "constant"}
SHARDING = "qforge shards the 4-bit base itself: run with --nproc N (or torchrun) and remove it"


class RecipeError(ValueError):
    """A recipe qforge cannot run as written; the message names the file and the keys."""


@dataclass
class Recipe:
    """A recipe read from a file: its dialect, the qforge settings it maps to, and notes on the
    keys accepted without effect."""
    dialect: str
    settings: dict
    notes: list[str] = field(default_factory=list)


# ---- converters: a recipe value -> a TrainConfig value ----------------------------------------
SKIP = object()  # a converter's answer for a value that sets nothing (false, zero, "disabled")


def _number(value, key: str, kind=float):
    """YAML reads 2e-4 (no dot) as a string: accept numbers written either way."""
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"'{key}' must be a number, got {value!r}") from None
    if kind is int and float(value) != number:
        raise ValueError(f"'{key}' must be a whole number, got {value!r}")
    return number


def text(value, key: str) -> str:
    return str(value)


def flag(value, key: str) -> bool:
    return bool(value)


def negated(value, key: str) -> bool:
    return not value


def whole(value, key: str) -> int:
    return _number(value, key, int)


def real(value, key: str) -> float:
    return _number(value, key)


def train_on(value, key: str) -> str:
    """train_on_inputs / train_on_prompt: the loss on every token, or on the answers only."""
    return "all" if value else "assistant"


def scheduler(value, key: str) -> str:
    if value not in SCHEDULERS:
        raise ValueError(f"qforge schedules are {sorted(SCHEDULERS)} (after linear warmup); got {value!r}")
    return SCHEDULERS[value]


def when_true(setting):
    """A converter giving `setting` for a true value and setting nothing for a false one."""
    return lambda value, key: setting if value else SKIP


def precision(dtype: str):
    """bf16 / fp16: true or auto computes in `dtype`; false sets nothing."""
    def convert(value, key: str):
        if value in (True, "auto", "true"):
            return dtype
        if value not in (False, "false"):
            raise ValueError(f"expected true, false or auto, got {value!r}")
        return SKIP
    return convert


def fraction(example: str):
    """val_set_size / val_size: a fraction of the rows held out; 0 holds none out."""
    def convert(value, key: str):
        value = _number(value, key)
        if value >= 1:
            raise ValueError(f"give a fraction of the rows (such as {example}); qforge splits by fraction")
        return value if value > 0 else SKIP
    return convert


# keys both tools name alike: key -> (TrainConfig field, converter)
COMMON_FIELDS = {
    "output_dir": ("output_dir", text), "lora_alpha": ("alpha", real), "lora_dropout": ("dropout", real),
    "gradient_accumulation_steps": ("grad_accum", whole), "learning_rate": ("lr", real),
    "warmup_steps": ("warmup_steps", whole), "warmup_ratio": ("warmup_ratio", real),
    "weight_decay": ("weight_decay", real), "max_grad_norm": ("max_grad_norm", real),
    "bf16": ("compute_dtype", precision("bfloat16")), "fp16": ("compute_dtype", precision("float16")),
    "logging_steps": ("log_every", whole), "eval_steps": ("eval_every", whole), "save_steps": ("save_every", whole),
    "seed": ("seed", whole),
}


def lora_target(value, key: str):
    """LLaMA-Factory's comma-separated module names; "all" is every linear layer."""
    names = [s.strip() for s in str(value).split(",") if s.strip()]
    return "all-linear" if names == ["all"] else names


def report_targets(value, key: str) -> str:
    targets = [t.strip() for t in (value if isinstance(value, list) else str(value).split(",")) if t.strip()]
    unknown = [t for t in targets if t not in ("tensorboard", "wandb", "none")]
    if unknown:
        raise ValueError(f"qforge reports to tensorboard and wandb; got {unknown}")
    return ",".join(targets) or "none"


# ---- the two mappers ----------------------------------------------------------------------------
class _Mapper:
    """Shared machinery: each key is read by its `key_<name>` method when it needs logic, else by
    FIELDS ({key: (TrainConfig field, converter)}), else noted (IGNORED), refused when set
    (OFF_ONLY) or refused by name; the results fill `settings`, `notes` and `refused`."""
    dialect = ""
    FIELDS: dict[str, tuple] = {}  # key -> (TrainConfig field, converter(value, key))
    IGNORED: dict[str, str] = {}   # key -> why it changes nothing here
    OFF_ONLY: dict[str, str] = {}  # key -> what to do instead; fine while false/empty/zero

    def __init__(self, path: Path):
        self.path = path
        self.settings: dict = {}
        self.notes: list[str] = []
        self.refused: list[str] = []

    def refuse(self, key: str, why: str) -> None:
        self.refused.append(f"{key} ({why})")

    def note(self, key: str, why: str) -> None:
        self.notes.append(f"{key}: {why}")

    def run(self, raw: dict) -> Recipe:
        self.raw = raw
        for key, value in raw.items():
            if value is None or value == "" or value == []:  # "key:" with nothing after it: not set
                continue
            try:
                self.read(key, value)
            except (ValueError, TypeError) as exc:  # TypeError: a value of the wrong kind (a list for a number)
                self.refuse(key, str(exc))
        self.finish()
        if self.refused:
            raise RecipeError(f"{self.path} ({self.dialect} recipe): qforge cannot honour "
                              f"{len(self.refused)} setting(s): " + "; ".join(self.refused))
        return Recipe(self.dialect, self.settings, self.notes)

    def read(self, key: str, value) -> None:
        handler = getattr(self, f"key_{key}", None)
        if handler is not None:
            handler(value)
        elif key in self.FIELDS:
            name, convert = self.FIELDS[key]
            converted = convert(value, key)
            if converted is not SKIP:
                self.set(name, converted)
        elif key in self.IGNORED:
            self.note(key, self.IGNORED[key])
        elif key in self.OFF_ONLY:
            if value:
                self.refuse(key, self.OFF_ONLY[key])
        else:
            self.refuse(key, f"not a setting qforge knows from {self.dialect} recipes; remove it")

    def finish(self) -> None:
        pass

    # shared by both dialects
    def set(self, name: str, value) -> None:
        self.settings[name] = value

    def optimizer(self, value) -> None:
        if value not in OPTIMIZERS:
            raise ValueError(f"qforge has {sorted(set(OPTIMIZERS.values()))}; got {value!r}")
        self.set("optimizer", OPTIMIZERS[value])
        if value == "paged_adamw_32bit":
            self.notes.append("optimizer: paged_adamw_32bit is AdamW with 32-bit state here (qforge pages only "
                              "its 8-bit AdamW)")

    # preference tuning, shared by both dialects
    def preference(self, objective: str, source: str) -> None:
        """Set the objective (dpo | orpo) and say where it came from in the notes."""
        self.set("objective", objective)
        self.note(source, f"qforge trains with objective {objective} (TRL's {objective.upper()} loss: "
                  "prompt tokens are context, the chosen and rejected replies are scored)")

    def check_preference(self, only_preference: list[str], only_dpo: list[str]) -> None:
        """After all keys: refuse preference keys given to an SFT recipe, and DPO-only keys given to
        ORPO, by name."""
        objective = self.settings.get("objective", "sft")
        for key in only_preference:
            if self.raw.get(key) not in (None, "", 0) and objective == "sft":  # 0: LLaMA-Factory's defaults
                self.refuse(key, "a preference-tuning setting, but the recipe trains SFT")
        for key in only_dpo:
            if self.raw.get(key) not in (None, "", 0) and objective == "orpo":
                self.refuse(key, "a DPO setting; ORPO has no reference model and no label smoothing")
