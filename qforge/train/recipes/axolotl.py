"""Axolotl's YAML recipes (SFT, and `rl: dpo|orpo` preference tuning) mapped onto TrainConfig."""
from __future__ import annotations

from pathlib import Path

from .common import (COMMON_FIELDS, SHARDING, SKIP, _Mapper, flag, fraction, real, scheduler, text, train_on,
                     when_true, whole)

AXOLOTL_KEYS = {"base_model", "datasets", "adapter", "load_in_4bit", "lora_r", "lora_target_linear", "sequence_len",
                "micro_batch_size", "num_epochs", "val_set_size", "sample_packing", "train_on_inputs",
                "lora_target_modules", "dataset_prepared_path", "lr_scheduler", "rl", "rl_beta", "dpo_beta",
                "orpo_alpha"}
AXOLOTL_DATA_TYPES = {"alpaca": "instruction", "chat_template": "auto", "sharegpt": "sharegpt",
                      "completion": "text", "pretrain": "text", "alpaca_chat": "instruction",
                      "oasst": "auto", "input_output": "completion"}
# Axolotl's preference dataset types whose rows qforge.train.preference_data reads as they are:
# chat_template.default: {"messages": [...], "chosen": {role, content}, "rejected": {...}} (a pair of
# ShareGPT-style turns); chat_template.argilla_chat: {"chosen": [...], "rejected": [...]} (whole
# conversations sharing the prompt turns, TRL's implicit prompt).
AXOLOTL_PREFERENCE_TYPES = ("chat_template.default", "chat_template.argilla_chat")
RL_METHODS = ("dpo", "orpo")
PREFERENCE_FIELDS = {"field_messages": "messages", "field_chosen": "chosen", "field_rejected": "rejected"}
# a custom instruction format (`type: {field_instruction: ..., ...}`): Axolotl's key -> qforge's row key
CUSTOM_TYPE_FIELDS = {"field_instruction": "instruction", "field_input": "input", "field_output": "output",
                      "field_system": "system"}
# a chat dataset's own keys: Axolotl's option -> what the named key becomes (qforge.train.fieldmap)
CHAT_FIELD_OPTIONS = {"field_messages": "messages", "message_field_role": "role", "message_field_content": "content"}


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
        "wandb_name": ("wandb_name", text), "lora_model_dir": ("adapter", text),
        "dpo_label_smoothing": ("label_smoothing", real),
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
        "dpo_use_logits_to_keep": "qforge scores only the completion tokens (the LM head runs in chunks)",
    }
    OFF_ONLY = {
        "load_in_8bit": "qforge's base is 4-bit (load_in_4bit: true) or BF16",
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
        "not supported", "relora_steps": "not supported",
        "rl_adapter_ref_model": "qforge's DPO reference is the base with the adapter switched off (no second "
        "model); a fixed reference adapter is --ref-adapter",
        "dpo_generate_during_eval": "evaluation measures loss and rewards only",
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
        fields = {}
        if isinstance(kind, dict):  # a custom instruction format: its field_* keys are a column mapping
            fields, kind = self.custom_type(kind, key), None
        self.data_type(kind, key)
        for k, value in ds.items():
            if not self.raw.get("rl") and self.column_option(k, value, fields):
                continue
            if not self.standard_dataset_option(k, value, key):
                raise ValueError(f"{key}[0].{k}={value!r}: qforge reads rows with their standard keys "
                                 "(messages/conversations, instruction/input/output, prompt/completion, text)")
        if fields and key == "datasets":
            self.set("field_map", fields)
        if not Path(path).exists() and "/" in str(path):
            raise ValueError(f"{path!r} is not a local file or folder; qforge reads local data (download the "
                             "dataset and save it with save_to_disk, or as JSONL/Parquet)")
        return str(path)

    def custom_type(self, kind: dict, key: str) -> dict:
        """`type: {field_instruction: q, field_output: a, ...}` -> {q: instruction, a: output}; the
        prompt-format strings (format, no_input_format, system_format) are the chat template's job."""
        fields = {}
        for k, value in kind.items():
            if k in CUSTOM_TYPE_FIELDS:
                if value != CUSTOM_TYPE_FIELDS[k]:
                    fields[str(value)] = CUSTOM_TYPE_FIELDS[k]
            elif k in ("format", "no_input_format", "system_format", "system_prompt"):
                self.note(f"{key}[0].type.{k}", "the chat template formats the rows")
            else:
                raise ValueError(f"{key}[0].type.{k}: qforge maps field_instruction, field_input, field_output "
                                 "and field_system")
        return fields

    def column_option(self, k: str, value, fields: dict) -> bool:
        """field_messages / message_field_* / message_property_mappings naming keys of the rows' own
        into `fields` (a column mapping); False for other options."""
        if k in CHAT_FIELD_OPTIONS and isinstance(value, str) and value not in (CHAT_FIELD_OPTIONS[k], "conversations",
                                                                                "from", "value"):
            fields[value] = CHAT_FIELD_OPTIONS[k]
            return True
        if k == "message_property_mappings" and isinstance(value, dict) and set(value) <= {"role", "content"}:
            fields.update({str(v): prop for prop, v in value.items() if v not in ("role", "content", "from", "value")})
            return True
        return False

    def data_type(self, kind, key: str) -> None:
        """A dataset's `type`: an SFT row format, or (with `rl:`) a preference format qforge reads."""
        if kind is None:
            return
        if self.raw.get("rl"):
            if kind not in AXOLOTL_PREFERENCE_TYPES:
                raise ValueError(f"preference dataset type {kind!r}: qforge reads "
                                 f"{', '.join(AXOLOTL_PREFERENCE_TYPES)} "
                                 "as they are (or leave type out: OpenAI, TRL and ShareGPT pairs are detected)")
            return  # qforge.train.preference_data detects the row shape
        if kind in AXOLOTL_PREFERENCE_TYPES:
            raise ValueError(f"{kind!r} is a preference dataset type; set rl: dpo or rl: orpo")
        if kind not in AXOLOTL_DATA_TYPES:
            raise ValueError(f"dataset type {kind!r}: qforge reads {sorted(AXOLOTL_DATA_TYPES)}")
        fmt = AXOLOTL_DATA_TYPES[kind]
        if fmt != "auto" and key == "datasets":
            self.set("data_format", fmt)

    def standard_dataset_option(self, k: str, value, key: str) -> bool:
        """True for a dataset option that asks for what qforge does anyway (or sets the template)."""
        if value in (None, "", []):
            return True
        if k in PREFERENCE_FIELDS:
            return value == PREFERENCE_FIELDS[k] or (k == "field_messages" and value == "conversations")
        if k == "ds_type":
            return value in ("json", "parquet", "csv", "arrow")
        if k == "split":
            return value == "train"
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

    def chat_template(self, value, key: str) -> None:
        """Axolotl's chat_template names: a model family's format (or one of its spellings)."""
        from ...model.templates import ALIASES, FAMILIES
        name = str(value).lower()
        if name not in FAMILIES and name not in ALIASES:
            raise ValueError(f"qforge's built-in templates are {', '.join(FAMILIES)} (or give a Jinja file with "
                             f"chat_template: FILE); got {value!r}")
        self.set("chat_template", ALIASES.get(name, name))

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

    def key_rl(self, v):
        if v not in RL_METHODS:
            raise ValueError(f"qforge tunes on preferences with rl: dpo (sigmoid loss) or rl: orpo; got {v!r}")
        self.preference(v, "rl")

    def key_rl_beta(self, v):
        real(v, "rl_beta")  # checked here, resolved in finish() with dpo_beta and orpo_alpha

    def key_dpo_beta(self, v):
        real(v, "dpo_beta")

    def key_orpo_alpha(self, v):
        real(v, "orpo_alpha")

    def beta(self) -> None:
        """DPO's beta from rl_beta (or its older name dpo_beta); ORPO's lambda from orpo_alpha (TRL
        calls it beta), else rl_beta."""
        given = {}
        for key in ("rl_beta", "dpo_beta", "orpo_alpha"):
            try:
                given[key] = real(self.raw[key], key)
            except (KeyError, TypeError, ValueError):  # absent, empty, or already refused by its key_ method
                pass
        objective = self.settings.get("objective")
        if objective == "orpo":
            if "dpo_beta" in given:
                self.refuse("dpo_beta", "DPO's beta; ORPO's weight is orpo_alpha")
            beta = given.get("orpo_alpha", given.get("rl_beta"))
        elif objective == "dpo":
            if "orpo_alpha" in given:
                self.refuse("orpo_alpha", "ORPO's weight, but rl is dpo (DPO's is rl_beta)")
            if {"rl_beta", "dpo_beta"} <= set(given) and given["rl_beta"] != given["dpo_beta"]:
                self.refuse("dpo_beta", f"differs from rl_beta ({given['rl_beta']}); give one of them")
            beta = given.get("rl_beta", given.get("dpo_beta"))
        else:
            return
        if beta is not None:
            self.set("beta", beta)
        if objective == "orpo" and "orpo_alpha" in given:
            self.note("orpo_alpha", "ORPO's lambda, the weight of the odds-ratio term (TRL's ORPO beta)")

    def finish(self) -> None:
        if "method" not in self.settings:
            self.set("method", "full")  # Axolotl without `adapter` fine-tunes every weight
        self.beta()
        self.check_preference(["rl_beta", "dpo_beta", "orpo_alpha", "dpo_label_smoothing"], ["dpo_label_smoothing"])
        self.notes = [n for n in self.notes if not n.endswith(": ")]
