"""Recipes from the tools people come from: qforge's own YAML, Axolotl's and LLaMA-Factory's SFT +
(Q)LoRA configs, told apart by their keys and mapped onto TrainConfig.

Every key with a meaning here is mapped; keys that only tune the other tool's machinery (caches,
worker counts, logging plots) are accepted and listed as notes; an empty value (`key:` with
nothing after it) means "not set" in both tools and is skipped; every other key is refused by
name, together with what qforge would need instead. `qforge train --config FILE --print-config`
shows the qforge recipe a file became.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import TrainConfig

AXOLOTL_KEYS = {"base_model", "datasets", "adapter", "load_in_4bit", "lora_r", "lora_target_linear", "sequence_len",
                "micro_batch_size", "num_epochs", "val_set_size", "sample_packing", "train_on_inputs",
                "lora_target_modules", "dataset_prepared_path", "lr_scheduler"}
LLAMAFACTORY_KEYS = {"model_name_or_path", "finetuning_type", "stage", "dataset", "cutoff_len", "lora_target",
                     "quantization_bit", "per_device_train_batch_size", "num_train_epochs", "lr_scheduler_type",
                     "template", "do_train", "lora_rank", "val_size"}

OPTIMIZERS = {  # both tools' optimiser names -> qforge's
    "paged_adamw_8bit": "paged_adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit",
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "paged_adamw_32bit": "adamw", "adamw_torch_4bit": "adamw_8bit",
}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
              "constant_with_warmup": "constant"}
AXOLOTL_DATA_TYPES = {"alpaca": "instruction", "chat_template": "auto", "sharegpt": "sharegpt",
                      "completion": "text", "pretrain": "text", "alpaca_chat": "instruction",
                      "oasst": "auto", "input_output": "completion"}
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

    def chat_template(self, value, key: str) -> None:
        from ..model.templates import ALIASES, BUILTIN
        name = str(value).lower()
        if name not in BUILTIN and name not in ALIASES:
            raise ValueError(f"qforge's built-in templates are {', '.join(BUILTIN)} (or give a Jinja file with "
                             f"chat_template: FILE); got {value!r}")
        self.set("chat_template", ALIASES.get(name, name))


class _Axolotl(_Mapper):
    dialect = "axolotl"
    FIELDS = COMMON_FIELDS | {
        "base_model": ("model", text), "revision_of_model": ("revision", text),
        "load_in_4bit": ("method", when_true("qlora")), "val_set_size": ("eval_fraction", fraction("0.05")),
        "sequence_len": ("max_seq_len", whole), "sample_packing": ("pack", flag), "lora_r": ("rank", whole),
        "lora_target_linear": ("target_modules", when_true("all-linear")),
        "peft_use_rslora": ("use_rslora", flag), "peft_use_dora": ("use_dora", flag),
        "micro_batch_size": ("batch_size", whole), "num_epochs": ("epochs", whole), "max_steps": ("max_steps", whole),
        "lr_scheduler": ("lr_scheduler", scheduler), "cosine_min_lr_ratio": ("min_lr_ratio", real),
        "train_on_inputs": ("train_on", train_on), "activation_offloading": ("offload_activations", flag),
        "evals_per_epoch": ("evals_per_epoch", whole), "saves_per_epoch": ("saves_per_epoch", whole),
        "auto_resume_from_checkpoints": ("resume", flag), "wandb_entity": ("wandb_entity", text),
        "wandb_name": ("wandb_name", text),
        "wandb_mode": ("wandb_mode", lambda value, key: SKIP if value == "disabled" else str(value)),
    }
    IGNORED = {
        "model_type": "qforge builds the causal LM named by the model's config.json",
        "tokenizer_type": "qforge loads the model's own tokenizer",
        "strict": "no effect here", "dataset_prepared_path": "qforge tokenises in memory; nothing is cached",
        "dataset_processes": "qforge tokenises in one process", "pad_to_sequence_len":
        "qforge pads each batch to its longest row; padding never enters the loss",
        "eval_sample_packing": "evaluation rows are never packed", "flash_attention":
        "qforge uses its own attention (PyTorch SDPA)", "sdp_attention": "qforge uses its own attention (PyTorch SDPA)",
        "xformers_attention": "qforge uses its own attention (PyTorch SDPA)", "local_rank": "set by the launcher",
        "tf32": "matmul precision is PyTorch's default", "debug": "no effect here", "save_safetensors":
        "adapters are always safetensors", "shuffle_merged_datasets": "one dataset: nothing to merge",
        "eval_batch_size": "evaluation uses micro_batch_size", "wandb_watch": "gradients are not uploaded",
        "wandb_log_model": "models are not uploaded", "eval_max_new_tokens": "evaluation measures loss only",
        "save_total_limit": "qforge keeps its checkpoints under output_dir/checkpoints",
        "dataloader_num_workers": "batches are built in the training process",
        "dataloader_pin_memory": "no effect here", "dataloader_prefetch_factor": "no effect here",
        "gradient_checkpointing_kwargs": "qforge's own checkpointing (non-reentrant)",
    }
    OFF_ONLY = {
        "load_in_8bit": "qforge's base is 4-bit (load_in_4bit: true) or BF16",
        "lora_model_dir": "qforge starts new adapters; continue a run with --resume",
        "lora_fan_in_fan_out": "PEFT's fan_in_fan_out layout is not used by Llama-style models",
        "early_stopping_patience": "qforge trains for num_epochs or max_steps; set max_steps",
        "deepspeed": SHARDING, "fsdp": SHARDING, "fsdp_config": SHARDING, "fsdp_version": SHARDING,
        "resume_from_checkpoint": "continue with --resume (from output_dir/checkpoints)",
        "eval_table_size": "evaluation measures loss only", "trust_remote_code":
        "qforge loads transformers' own architectures only", "hub_model_id": "upload the adapter folder yourself",
        "push_dataset_to_hub": "qforge uploads nothing", "tokens": "qforge does not add tokens or resize embeddings",
        "lora_modules_to_save": "qforge trains LoRA layers only (or --method full)",
        "loraplus_lr_ratio": "qforge uses one learning rate", "unfrozen_parameters": "use --method full",
        "torch_compile": "qforge picks its kernels itself (qforge.kernels.dispatch)",
        "lora_on_cpu": "no effect here", "gpu_memory_limit": "see `qforge plan`", "neftune_noise_alpha":
        "not supported", "relora_steps": "not supported", "rl": "qforge trains supervised (SFT) only",
        "group_by_length": "qforge batches in a seeded random order; remove it",
    }

    def key_base_model_config(self, v):
        if v != self.raw.get("base_model"):
            raise ValueError("qforge reads the config beside the weights; point base_model at that folder")

    def key_tokenizer_config(self, v):
        if v != self.raw.get("base_model"):
            raise ValueError("qforge uses the base model's tokenizer; put the tokenizer files in its folder")

    def key_adapter(self, v):
        if v not in ("qlora", "lora"):
            raise ValueError(f"qforge trains qlora or lora adapters (or full fine-tuning without `adapter`); got {v!r}")
        if v == "qlora" or self.raw.get("load_in_4bit"):
            self.set("method", "qlora")
        else:
            self.set("method", "lora")

    def key_bnb_config_kwargs(self, v):
        if not isinstance(v, dict):
            raise ValueError("expected a mapping")
        for k, value in v.items():
            if k == "bnb_4bit_quant_type":
                self.set("quant_type", value)
            elif k == "bnb_4bit_use_double_quant":
                self.set("double_quant", bool(value))
            elif k not in ("llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype"):
                raise ValueError(f"{k}: qforge knows bnb_4bit_quant_type and bnb_4bit_use_double_quant")

    def key_datasets(self, v):
        self.set("data", self.dataset(v, "datasets"))

    def key_test_datasets(self, v):
        self.set("eval_data", self.dataset(v, "test_datasets"))

    def dataset(self, v, key: str) -> str:
        if not isinstance(v, list) or len(v) != 1 or not isinstance(v[0], dict) or "path" not in v[0]:
            raise ValueError("qforge trains on one dataset: a list with one entry with a `path` "
                             "(concatenate several files into one)")
        ds = dict(v[0])
        path = ds.pop("path")
        files = ds.pop("data_files", None)
        if files:
            files = files if isinstance(files, list) else [files]
            if len(files) != 1:
                raise ValueError("qforge trains on one file: give one data_files entry")
            path = str(Path(path) / files[0]) if Path(path).is_dir() else files[0]
        kind = ds.pop("type", None)
        if kind is not None:
            if kind not in AXOLOTL_DATA_TYPES:
                raise ValueError(f"dataset type {kind!r}: qforge reads {sorted(AXOLOTL_DATA_TYPES)}")
            fmt = AXOLOTL_DATA_TYPES[kind]
            if fmt != "auto" and key == "datasets":
                self.set("data_format", fmt)
        for k, value in ds.items():
            if not self.standard_dataset_option(k, value, key):
                raise ValueError(f"{key}[0].{k}={value!r}: qforge reads rows with their standard keys "
                                 "(messages/conversations, instruction/input/output, prompt/completion, text)")
        if not Path(path).exists() and "/" in str(path):
            raise ValueError(f"{path!r} is not a local file or folder; qforge reads local data (download the "
                             "dataset and save it with save_to_disk, or as JSONL/Parquet)")
        return str(path)

    def standard_dataset_option(self, k: str, value, key: str) -> bool:
        """True for a dataset option that asks for what qforge does anyway (or sets the template)."""
        if value in (None, "", []):
            return True
        if k == "ds_type":
            return value in ("json", "parquet", "csv", "arrow")
        if k == "split":
            return value == "train"
        if k == "field_messages":
            return value in ("messages", "conversations")
        if k == "roles_to_train":
            return isinstance(value, list) and set(value) <= {"assistant", "gpt"}
        if k == "train_on_eos":
            return value in ("turn", "last")
        if k in ("message_property_mappings", "message_field_role", "message_field_content"):
            mapping = value if isinstance(value, dict) else {k: value}
            return all(m in ("role", "content", "from", "value") for m in mapping.values())
        if k == "chat_template":
            self.chat_template(value, f"{key}.chat_template")
            return True
        return False

    def key_lora_target_modules(self, v):
        if not self.raw.get("lora_target_linear"):
            self.set("target_modules", [str(m) for m in (v if isinstance(v, list) else [v])])

    def key_optimizer(self, v):
        self.optimizer(v)

    def key_gradient_checkpointing(self, v):
        if v not in (True, False, "unsloth", "offload"):
            raise ValueError(f"expected true or false, got {v!r}")
        self.set("gradient_checkpointing", bool(v))
        if v == "offload":  # Axolotl's checkpointing with the layer inputs offloaded to host memory
            self.set("offload_activations", True)

    def key_chat_template(self, v):
        if v == "jinja":
            template = self.raw.get("chat_template_jinja")
            if not template:
                raise ValueError("chat_template: jinja needs chat_template_jinja (a file)")
            if not Path(str(template)).expanduser().is_file():
                raise ValueError("chat_template_jinja: qforge takes a Jinja file; put the template in one")
            self.set("chat_template", str(template))
        elif v == "tokenizer_default":
            return
        else:
            self.chat_template(v, "chat_template")

    def key_chat_template_jinja(self, v):
        if self.raw.get("chat_template") != "jinja":
            raise ValueError("used only with chat_template: jinja")

    def key_special_tokens(self, v):
        if not isinstance(v, dict) or set(v) - {"pad_token"}:
            raise ValueError("qforge keeps the tokenizer's special tokens (it pads with the pad or end-of-text "
                             "token); remove all but pad_token")
        self.note("special_tokens.pad_token", "qforge pads with the tokenizer's pad token, else its "
                  "end-of-sequence token; padding never enters the loss")

    def key_use_tensorboard(self, v):
        if v:
            self.add_report("tensorboard")

    def key_wandb_project(self, v):
        self.add_report("wandb")
        self.set("wandb_project", str(v))

    def add_report(self, target: str) -> None:
        current = [t for t in self.settings.get("report_to", "none").split(",") if t != "none"]
        self.set("report_to", ",".join(sorted(set(current + [target]))))

    def finish(self) -> None:
        if "method" not in self.settings:
            self.set("method", "full")  # Axolotl without `adapter` fine-tunes every weight
        self.notes = [n for n in self.notes if not n.endswith(": ")]


class _LlamaFactory(_Mapper):
    dialect = "llama-factory"
    FIELDS = COMMON_FIELDS | {
        "model_name_or_path": ("model", text), "model_revision": ("revision", text),
        "quantization_type": ("quant_type", text), "double_quantization": ("double_quant", flag),
        "lora_target": ("target_modules", lora_target), "lora_rank": ("rank", whole),
        "use_rslora": ("use_rslora", flag), "use_dora": ("use_dora", flag), "cutoff_len": ("max_seq_len", whole),
        "max_samples": ("max_samples", whole), "per_device_train_batch_size": ("batch_size", whole),
        "num_train_epochs": ("epochs", whole),
        "max_steps": ("max_steps", lambda value, key: whole(value, key) if int(value) > 0 else SKIP),
        "lr_scheduler_type": ("lr_scheduler", scheduler), "pure_bf16": ("compute_dtype", precision("bfloat16")),
        "disable_gradient_checkpointing": ("gradient_checkpointing", negated), "packing": ("pack", flag),
        "train_on_prompt": ("train_on", train_on), "val_size": ("eval_fraction", fraction("0.1")),
        "report_to": ("report_to", report_targets), "run_name": ("wandb_name", text),
    }
    IGNORED = {
        "do_train": "qforge trains", "overwrite_cache": "qforge tokenises in memory; nothing is cached",
        "preprocessing_num_workers": "qforge tokenises in one process", "overwrite_output_dir":
        "qforge writes into output_dir (resume with --resume)", "plot_loss": "qforge always writes loss.png",
        "ddp_timeout": "set by the launcher", "per_device_eval_batch_size": "evaluation uses the training batch size",
        "quantization_method": "bitsandbytes' NF4/FP4 as qforge's own 4-bit", "flash_attn": "qforge uses its own attention (PyTorch SDPA)",
        "dataloader_num_workers": "batches are built in the training process",
        "save_only_model": "checkpoints hold the adapter and the optimiser state",
        "eval_strategy": "evaluation runs every eval_steps steps", "save_strategy": "checkpoints every save_steps steps",
        "dataset_dir": "read with `dataset`", "do_eval": "evaluation runs when there is an eval split",
    }
    OFF_ONLY = {
        "deepspeed": SHARDING, "fsdp": SHARDING, "resume_from_checkpoint":
        "continue with --resume (from output_dir/checkpoints)", "adapter_name_or_path":
        "qforge starts new adapters; continue a run with --resume", "pissa_init": "not supported",
        "loraplus_lr_ratio": "qforge uses one learning rate", "additional_target":
        "qforge trains LoRA layers only (or finetuning_type: full)", "neftune_noise_alpha": "not supported",
        "mask_history": "qforge trains every assistant turn", "streaming": "qforge reads the whole file",
        "use_unsloth": "qforge picks its kernels itself", "do_predict": "qforge measures eval loss; use qforge serve "
        "for generations", "trust_remote_code": "qforge loads transformers' own architectures only",
        "resize_vocab": "qforge does not add tokens or resize embeddings",
        "push_to_hub": "upload the adapter folder yourself", "enable_liger_kernel": "qforge picks its kernels itself",
    }

    def key_quantization_bit(self, v):
        if int(v) != 4:
            raise ValueError("qforge's quantised base is 4-bit (quantization_bit: 4)")
        method = self.raw.get("quantization_method", "bitsandbytes")
        if method not in ("bitsandbytes", "bnb", None):
            raise ValueError(f"qforge quantises as bitsandbytes does (NF4/FP4); quantization_method {method!r}")

    def key_stage(self, v):
        if v != "sft":
            raise ValueError(f"qforge trains supervised fine-tuning (stage: sft); got {v!r}")

    def key_finetuning_type(self, v):
        if v == "full":
            self.set("method", "full")
        elif v == "lora":
            self.set("method", "qlora" if self.raw.get("quantization_bit") else "lora")
        else:
            raise ValueError(f"qforge trains lora (4-bit with quantization_bit: 4) or full; got {v!r}")

    def key_dataset(self, v):
        self.set("data", self.dataset(v, "dataset"))

    def key_eval_dataset(self, v):
        self.set("eval_data", self.dataset(v, "eval_dataset"))

    def dataset(self, v, key: str) -> str:
        """A dataset name from dataset_dir/dataset_info.json (LLaMA-Factory's registry of local
        files), or a path to a file."""
        names = [s.strip() for s in str(v).split(",") if s.strip()]
        if len(names) != 1:
            raise ValueError("qforge trains on one dataset: concatenate the files into one and name it")
        name = names[0]
        folder = Path(str(self.raw.get("dataset_dir") or "data"))
        info_path = folder / "dataset_info.json"
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{info_path}: not valid JSON ({exc.msg})") from None
            if name in info:
                entry = info[name]
                if "file_name" not in entry:
                    raise ValueError(f"{info_path}: '{name}' names no local file_name (Hub and script datasets "
                                     "are not read; download it and save it as JSONL, Parquet or save_to_disk)")
                fmt = entry.get("formatting", "alpaca")
                if fmt not in ("alpaca", "sharegpt"):
                    raise ValueError(f"{info_path}: '{name}' has formatting {fmt!r}; qforge reads alpaca and sharegpt")
                columns = entry.get("columns") or {}
                standard = {"prompt": "instruction", "query": "input", "response": "output", "messages":
                            "conversations", "system": "system"}
                odd = {k: c for k, c in columns.items() if standard.get(k, c) != c and c not in ("messages",)}
                if odd:
                    raise ValueError(f"{info_path}: '{name}' renames columns {odd}; qforge reads the standard "
                                     "names (instruction/input/output, conversations or messages)")
                if key == "dataset":
                    self.set("data_format", "instruction" if fmt == "alpaca" else "sharegpt")
                return str(folder / entry["file_name"])
        if Path(name).exists():
            return name
        raise ValueError(f"'{name}' is neither a dataset in {info_path} nor a file; qforge reads local data")

    def key_template(self, v):
        if v in ("default", "empty", "alpaca"):
            raise ValueError("qforge renders rows with the tokenizer's chat template or a built-in one "
                             "(chatml, llama3, gemma, mistral, qwen, phi3); remove it to use the model's own")
        self.chat_template(v, "template")

    def key_optim(self, v):
        self.optimizer(v)

    def finish(self) -> None:
        if "method" not in self.settings:
            self.set("method", "lora")  # LLaMA-Factory's default finetuning_type
        if self.raw.get("quantization_bit") and self.settings["method"] == "full":
            self.refuse("quantization_bit", "a 4-bit base trains adapters: finetuning_type: lora")
        if "rank" in self.settings and "alpha" not in self.settings:
            self.set("alpha", float(self.settings["rank"] * 2))  # LLaMA-Factory's default lora_alpha
        elif "rank" not in self.settings and "alpha" not in self.settings:
            self.set("rank", 8)  # LLaMA-Factory's defaults: lora_rank 8, lora_alpha twice that
            self.set("alpha", 16.0)
        self.notes = [n for n in self.notes if not n.endswith(": ")]
