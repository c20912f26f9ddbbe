"""LLaMA-Factory's YAML recipes (stage sft, and stage dpo with pref_loss sigmoid|orpo) and its
dataset_info.json registry mapped onto TrainConfig."""
from __future__ import annotations

from pathlib import Path

from .common import (COMMON_FIELDS, SHARDING, SKIP, _Mapper, flag, fraction, lora_target, negated, precision,
                     real, report_targets, scheduler, text, train_on, whole)

LLAMAFACTORY_KEYS = {"model_name_or_path", "finetuning_type", "stage", "dataset", "cutoff_len", "lora_target",
                     "quantization_bit", "per_device_train_batch_size", "num_train_epochs", "lr_scheduler_type",
                     "template", "do_train", "lora_rank", "val_size", "pref_beta", "pref_loss", "pref_ftx"}
PREF_LOSSES = {"sigmoid": "dpo", "orpo": "orpo"}  # LLaMA-Factory's pref_loss -> qforge's objective


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
        "pref_beta": ("beta", real), "dpo_label_smoothing": ("label_smoothing", real),
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
        "continue with --resume (from output_dir/checkpoints)", "pissa_init": "not supported",
        "pref_ftx": "DPO plus an SFT term (pref_ftx) is not supported; set it to 0, or use pref_loss: orpo "
        "(ORPO's loss has the SFT term built in)", "pref_bco_weight": "BCO's term is not supported",
        "create_new_adapter": "qforge continues the adapter it is given (adapter_name_or_path); remove it",
        "loraplus_lr_ratio": "qforge uses one learning rate", "additional_target":
        "qforge trains LoRA layers only (or finetuning_type: full)", "neftune_noise_alpha": "not supported",
        "mask_history": "qforge trains every assistant turn", "streaming": "qforge reads the whole file",
        "use_unsloth": "qforge picks its kernels itself", "do_predict": "qforge measures eval loss; use qforge serve "
        "for generations", "trust_remote_code": "qforge loads transformers' own architectures only",
        "resize_vocab": "qforge does not add tokens or resize embeddings",
        "push_to_hub": "upload the adapter folder yourself", "enable_liger_kernel": "qforge picks its kernels itself",
    }

    def __init__(self, path: Path):
        super().__init__(path)
        self.ranking: dict[str, bool] = {}  # dataset key -> whether its dataset_info entry is ranking

    def key_quantization_bit(self, v):
        if int(v) != 4:
            raise ValueError("qforge's quantised base is 4-bit (quantization_bit: 4)")
        method = self.raw.get("quantization_method", "bitsandbytes")
        if method not in ("bitsandbytes", "bnb", None):
            raise ValueError(f"qforge quantises as bitsandbytes does (NF4/FP4); quantization_method {method!r}")

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
        files), or a path to a file. An entry in the default alpaca or sharegpt layout names its file;
        one with its own columns or tags, or a ranking one, is named by reference
        (`DIR/dataset_info.json#NAME`) and read through qforge.train.dataset_info."""
        from ..dataset_info import INFO_FILE, read_entry
        names = [s.strip() for s in str(v).split(",") if s.strip()]
        if len(names) != 1:
            raise ValueError("qforge trains on one dataset: concatenate the files into one and name it")
        name = names[0]
        info_path = Path(str(self.raw.get("dataset_dir") or "data")) / INFO_FILE
        if info_path.is_file():
            try:
                entry = read_entry(info_path, name)
            except KeyError:
                entry = None
            if entry is not None:
                self.ranking[key] = entry.ranking
                if entry.is_plain():
                    if key == "dataset":
                        self.set("data_format", "instruction" if entry.formatting == "alpaca" else "sharegpt")
                    return str(entry.file)
                if key == "dataset" and not entry.ranking:
                    self.set("data_format", "chat")  # the converted rows are chat rows
                self.note(key, f"'{name}' read by its dataset_info.json columns and tags (formatting "
                          f"{entry.formatting}{', ranking' if entry.ranking else ''})")
                return entry.reference()
        if Path(name).exists():
            return name
        raise ValueError(f"'{name}' is neither a dataset in {info_path} nor a file; qforge reads local data")

    def key_template(self, v):
        from ...model.templates import llamafactory_template
        self.set("chat_template", llamafactory_template(v))

    def key_stage(self, v):
        if v not in ("sft", "dpo"):
            raise ValueError(f"qforge trains stage sft or stage dpo (pref_loss sigmoid or orpo); got {v!r}")
        if v == "dpo":
            loss = self.raw.get("pref_loss") or "sigmoid"
            if loss in PREF_LOSSES:  # a bad pref_loss is refused by its own key
                self.preference(PREF_LOSSES[loss], "stage")

    def key_pref_loss(self, v):
        if v not in PREF_LOSSES:
            raise ValueError(f"qforge has pref_loss {' and '.join(PREF_LOSSES)} (TRL's DPO and ORPO); got {v!r}")

    def key_ref_model(self, v):
        """LLaMA-Factory's separate reference model: an adapter folder becomes qforge's reference
        adapter; the base itself is qforge's reference anyway (the adapter switched off)."""
        if Path(str(v), "adapter_config.json").is_file():
            self.set("ref_adapter", str(v))
        elif v == self.raw.get("model_name_or_path"):
            self.note("ref_model", "the base model is the reference: qforge scores it with the adapter switched "
                      "off (no second copy)")
        else:
            raise ValueError("qforge's reference is the base with the adapter off, or an adapter folder on the "
                             f"same base (ref_model: ADAPTER_DIR); {v!r} is neither")

    def key_ref_model_adapters(self, v):
        folders = [s.strip() for s in str(v).split(",") if s.strip()]
        if len(folders) != 1 or not Path(folders[0], "adapter_config.json").is_file():
            raise ValueError("qforge's reference adapter is one PEFT adapter folder on the same base")
        if self.raw.get("ref_model") not in (None, self.raw.get("model_name_or_path")):
            raise ValueError("used with ref_model equal to model_name_or_path (the same base)")
        self.set("ref_adapter", folders[0])

    def key_ref_model_quantization_bit(self, v):
        if int(v) != 4:
            raise ValueError("qforge's reference is the same 4-bit base the adapter trains on")
        self.note("ref_model_quantization_bit", "the reference is the training base itself (4-bit)")

    def key_adapter_name_or_path(self, v):
        folders = [s.strip() for s in str(v).split(",") if s.strip()]
        if len(folders) != 1:
            raise ValueError("qforge continues one adapter: give one folder (merge the others first)")
        self.set("adapter", folders[0])

    def key_optim(self, v):
        self.optimizer(v)

    def finish(self) -> None:
        if "method" not in self.settings:
            self.set("method", "lora")  # LLaMA-Factory's default finetuning_type
        self.check_preference(["pref_beta", "pref_loss", "dpo_label_smoothing", "ref_model", "ref_model_adapters",
                               "ref_model_quantization_bit"],
                              ["dpo_label_smoothing", "ref_model", "ref_model_adapters", "ref_model_quantization_bit"])
        if self.settings.get("objective") == "orpo" and "beta" in self.settings:
            self.note("pref_beta", "ORPO's lambda, the weight of the odds-ratio term (TRL's ORPO beta)")
        wants = self.settings.get("objective", "sft") != "sft"
        for key, ranking in self.ranking.items():
            if ranking != wants:
                self.refuse(key, "stage dpo trains on a ranking: true dataset" if wants else
                            "a ranking: true dataset (preference pairs) trains with stage: dpo")
        if self.raw.get("quantization_bit") and self.settings["method"] == "full":
            self.refuse("quantization_bit", "a 4-bit base trains adapters: finetuning_type: lora")
        if "rank" in self.settings and "alpha" not in self.settings:
            self.set("alpha", float(self.settings["rank"] * 2))  # LLaMA-Factory's default lora_alpha
        elif "rank" not in self.settings and "alpha" not in self.settings:
            self.set("rank", 8)  # LLaMA-Factory's defaults: lora_rank 8, lora_alpha twice that
            self.set("alpha", 16.0)
        self.notes = [n for n in self.notes if not n.endswith(": ")]
