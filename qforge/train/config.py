"""TrainConfig: every setting of a run. A YAML recipe is a serialised TrainConfig: each key has the
name of its command-line flag (with '_' for '-'), and flags given on the command line win."""
from __future__ import annotations

import contextvars
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

METHODS = ("qlora", "lora", "full")
LR_SCHEDULERS = ("cosine", "linear", "constant")
REPORT_TO = ("tensorboard", "wandb", "none")
# float32: adapter weights kept, updated and saved in float32 (PEFT's default), computed in compute_dtype;
# bfloat16: kept in BF16, where an optimiser step under half a BF16 ulp of a weight is lost.
ADAPTER_DTYPES = ("float32", "bfloat16")
# bfloat16: the residual stream between layers in the compute dtype; float32: embeddings (and a tied
# lm_head), norms and the adapted layers' outputs in float32, as PEFT's prepare_model_for_kbit_training;
# auto (the default): float32 for the adapter methods (PEFT's eval losses, measured in BENCHMARKS.md's
# "One configuration" section), bfloat16 for full fine-tuning (every weight trains in compute_dtype)
RESIDUAL_DTYPES = ("auto", "bfloat16", "float32")
QUANT_TYPES = ("nf4", "fp4", "hqq4", "hqq3", "hqq2")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw")  # adamw: torch's, 32-bit state
# what the run learns from: demonstrations (sft), or preference pairs with DPO's sigmoid loss against a
# reference (the base with adapters off, or ref_adapter) or ORPO's reference-free odds-ratio loss
OBJECTIVES = ("sft", "dpo", "orpo")  # qlora's base: bitsandbytes 4-bit, or HQQ at 4/3/2 bits
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
DATA_FORMATS = ("auto", "chat", "sharegpt", "instruction", "completion", "text")
TRAIN_ON = ("assistant", "all")
WANDB_MODES = ("online", "offline", "disabled")

# How the interface in use spells a setting in the messages that advise it: "cli" (a flag), "recipe"
# (a YAML key) or "api" (a jobs API hyperparameter; None where the API has no such setting). The jobs
# trainer sets "api" (qforge.jobs.trainer_child); the rest default to the command line.
INTERFACE = contextvars.ContextVar("qforge_interface", default="cli")
# settings a job's hyperparameters take under another name (learning_rate_multiplier scales lr)
API_NAMES = {"epochs": "n_epochs", "lr": "learning_rate_multiplier"}
API_SETTINGS = {"method", "rank", "alpha", "dropout", "target_modules", "quant_type", "double_quant", "max_seq_len",
                "max_steps", "save_every", "grad_accum", "compute_dtype", "batch_size", "beta", "label_smoothing",
                "epochs", "lr"}


def setting(name: str, value=None, interface: str | None = None) -> str | None:
    """A TrainConfig setting (and an optional value) as the current interface spells it:
    setting("max_seq_len", 1024) -> "--max-seq-len 1024" (cli), "max_seq_len: 1024" (recipe),
    "hyperparameters.max_seq_len = 1024" (api); None when the jobs API has no such setting, so the
    caller can say what the API user can do instead. A False boolean is its --no- flag."""
    interface = interface or INTERFACE.get()
    if interface == "api":
        if name not in API_SETTINGS:
            return None
        key = API_NAMES.get(name, name)
        return f"hyperparameters.{key}" + ("" if value is None else f" = {json.dumps(value)}")
    if interface == "recipe":
        return name + ("" if value is None else f": {json.dumps(value) if isinstance(value, str) else value}")
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return flag + ("" if value is None else f" {value}")


@dataclass
class TrainConfig:
    model: str = "smollm2"
    revision: str | None = None  # of a Hub model id (branch, tag or commit)
    data: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.0
    data_format: str = "auto"
    train_on: str = "assistant"
    max_samples: int | None = None
    # your keys -> qforge's: a role (system/user/assistant: the row becomes a chat), a row key
    # (instruction, input, output, prompt, completion, text, messages, conversations) or a turn key
    # (role, content); e.g. {"question": "user", "answer": "assistant"} (qforge.train.fieldmap)
    field_map: dict | None = None
    chat_template: str | None = None  # a built-in name (qforge.model.templates) or a Jinja file
    method: str = "qlora"
    objective: str = "sft"  # see OBJECTIVES; dpo/orpo read preference pairs (qforge.train.preference_data)
    beta: float = 0.1  # DPO's beta (strength of the reference), ORPO's lambda (weight of the odds-ratio term)
    label_smoothing: float = 0.0  # DPO: the share of pairs assumed mislabelled, in [0, 0.5)
    ref_adapter: str | None = None  # DPO's reference: a PEFT adapter folder on the same base (None: the base)
    adapter: str | None = None  # an adapter folder to continue training (e.g. SFT's, before DPO)
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    loftq_iters: int = 0
    quant_type: str = "nf4"
    double_quant: bool = True
    hqq_group_size: int = 64  # values per scale and zero-point of an HQQ base (quant_type hqq4/hqq3/hqq2)
    compute_dtype: str = "bfloat16"
    adapter_dtype: str = "float32"  # the adapters' weights (products run in compute_dtype); see ADAPTER_DTYPES
    residual_dtype: str = "auto"  # the residual stream between layers; see RESIDUAL_DTYPES (resolved on creation)
    optimizer: str = "paged_adamw_8bit"
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # when set, wins over warmup_ratio
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 512
    pack: bool = False
    gradient_checkpointing: bool = True
    offload_activations: bool = False  # saved activations wait in host memory (qforge.train.offload)
    offload_base: bool = False  # the 4-bit base waits in host memory, a block at a time on the device (offload_base.py)
    keep_base_outputs: bool | None = None  # None: auto (qforge.plan.keep_base_outputs_for)
    eval_every: int = 0
    save_every: int | None = None  # None: every 10% of the run (auto_save_every); 0: only at the end
    log_every: int = 1
    seed: int = 0
    output_dir: str = "runs/qforge"
    resume: bool | str = False  # true: from the last checkpoint; "auto": that when there is one, quietly
    device: str = "auto"  # qforge.devices.resolve_device: auto, cpu, cuda, cuda:N
    report_to: str = "none"  # comma-separated: tensorboard, wandb, none
    evals_per_epoch: int | None = None  # Axolotl's: eval_every from the steps in an epoch, once known
    saves_per_epoch: int | None = None  # likewise save_every
    wandb_project: str | None = None  # Weights & Biases run settings (report_to wandb); default project "qforge"
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: str | None = None  # online / offline; default: online when logged in, else offline

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.objective != "dpo" and self.ref_adapter is not None:
            raise ValueError(f"ref_adapter: a reference adapter is for objective dpo, not {self.objective}")
        if self.objective != "sft" and self.method == "full":
            raise ValueError(f"objective {self.objective}: preference tuning trains adapters (method qlora or "
                             "lora): the reference is the same base with the adapters off")
        for name in ("rank", "batch_size", "grad_accum", "max_seq_len", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.resume not in (True, False, "auto"):
            raise ValueError(f"resume: expected true, false or auto, got {self.resume!r}")
        if self.keep_base_outputs not in (None, True, False):
            raise ValueError(f"keep_base_outputs: expected true, false or null (auto), got {self.keep_base_outputs!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler: expected one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples: must be >= 1, got {self.max_samples}")
        unknown = [r for r in self.report_targets() if r not in REPORT_TO]
        if unknown or not str(self.report_to).strip():
            raise ValueError(f"report_to: expected a comma-separated list of {', '.join(REPORT_TO)}, "
                             f"got {self.report_to!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype: expected one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype: expected one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}")
        if self.residual_dtype == "auto":  # resolved here, so every reader sees bfloat16 or float32
            self.residual_dtype = "bfloat16" if self.method == "full" else "float32"
        if self.residual_dtype == "float32" and self.method == "full":
            raise ValueError("residual_dtype: float32 is for the adapter methods (qlora, lora); full fine-tuning "
                             "trains every weight in compute_dtype")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type: expected one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.offload_base not in (True, False):
            raise ValueError(f"offload_base: expected true or false, got {self.offload_base!r}")
        if self.offload_base and self.method != "qlora":
            raise ValueError(f"offload_base: keeps a 4-bit base in host memory; method {self.method} has none "
                             "(use method qlora)")
        if self.offload_base and self.quant_type.startswith("hqq"):
            raise ValueError(f"offload_base: offloads an nf4 or fp4 base, not quant_type {self.quant_type} (HQQ)")
        if not isinstance(self.hqq_group_size, int) or self.hqq_group_size < 1:
            raise ValueError(f"hqq_group_size: must be a positive integer, got {self.hqq_group_size!r}")
        if self.save_every is not None and (isinstance(self.save_every, bool) or self.save_every < 0):
            raise ValueError(f"save_every: expected a whole number >= 0 (0: no checkpoint until the end), "
                             f"got {self.save_every!r}")
        if self.field_map is not None:
            from .fieldmap import check_field_map
            self.field_map = check_field_map(self.field_map)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name, allowed in (("data_format", DATA_FORMATS), ("train_on", TRAIN_ON), ("compute_dtype", COMPUTE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def checkpoint_every(self, total_steps: int) -> int:
        """Steps between checkpoints: save_every when given (0: none until the end), else every 10%
        of a run of `total_steps` (at least 1)."""
        if self.save_every is not None:
            return self.save_every
        return max(1, math.ceil(total_steps / 10))

    def report_targets(self) -> list[str]:
        """The trackers asked for by report_to, 'none' left out."""
        return [r.strip() for r in str(self.report_to).split(",") if r.strip() and r.strip() != "none"]

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps`: warmup_steps when set, else warmup_ratio of them."""
        return self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_ratio * total_steps))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        """Read a recipe; an unknown key is an error naming the file and the key."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(raw) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {cls.field_names()}")
        return cls(**{**raw, **(overrides or {})})

    def to_yaml(self) -> str:
        data = dataclasses.asdict(self)
        return yaml.safe_dump(data, sort_keys=False)
