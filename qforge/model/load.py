"""Load a causal LM for QLoRA, streaming: the dense model is never held in memory.

The model skeleton is built on the meta device; each weight is then read from the safetensors
files on its own (plain file reads, no mmap: mapped pages would stay counted in the process'
resident memory), and a target Linear's weight is quantised at once and dropped. Everything else
is materialised in the compute dtype. Checkpoint names are read through transformers' own
conversion mapping for the architecture (qforge.model.conversion: Mixtral's per-expert tensors
merged into fused expert parameters one layer at a time, GPT-NeoX's `embed_out` ...).
Non-persistent buffers (rotary inv_freq) are not in checkpoints; they are recomputed as
transformers recomputes them, by the model's `_init_weights`.

Sources: a Hugging Face folder (single or sharded safetensors), a folder in bitsandbytes' 4-bit
format (read as stored, never requantised), a GGUF file (materialised by transformers' GGUF
loader, then quantised), or "smollm2", the embedded model: converted once to a float32 folder,
and quantised once per 4-bit setting to a bitsandbytes folder, both cached, so later loads only
read ~100 MB of stored 4-bit tensors.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..nn import AdaptedLinear, Quant4bitBase
from ..nn.hqq_base import HQQBase, base_from_state_dict as hqq_base_from_state_dict
from ..quant.hqq import hqq_nbits, hqq_state_keys
from ..quant import QuantState, quantize as quantize_tensor
from .checkpoint import INDEX_NAME, WEIGHTS_NAME, read_bnb_config, save_tokenizer, write_new_folder
from .conversion import (convert_checkpoint, expert_parameter_names, place_expert_parameter, router_linear_names,
                         stored_expert_bank)
from .surgery import DEFAULT_SKIP, linear_names, place_expert_bank, quantize_linears, select_targets, set_module

SMOLLM2 = "smollm2"
SMOLLM2_CACHE = ("models", "smollm2-135m-instruct")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
QUANT_CACHE_VERSION = 1  # bump when quantisation results change, to rebuild cached 4-bit copies

CPU = torch.device("cpu")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---- safetensors, read tensor by tensor ---------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One .safetensors file: the header is parsed and checked against the file size up front, so a
    truncated file is a ValueError naming the file and the first tensor that does not fit.
    `read(key)` returns a fresh tensor holding a copy of that tensor's bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file '{self.path}' not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or 8 + n > size:
                raise ValueError(f"'{self.path}' is truncated or not a safetensors file ({size} bytes, "
                                 + (f"header of {n} bytes)" if len(head) == 8 else "no header)"))
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"'{self.path}': unreadable safetensors header ({exc})") from exc
        self.tensors = {key: self._info(key, spec, 8 + n, size) for key, spec in header.items()
                        if key != "__metadata__"}

    def _info(self, key: str, spec: dict, base: int, size: int) -> TensorInfo:
        if spec.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"'{self.path}': tensor '{key}' has unsupported dtype {spec.get('dtype')!r}")
        dtype, shape = _ST_DTYPES[spec["dtype"]], tuple(int(s) for s in spec["shape"])
        start, end = (base + int(o) for o in spec["data_offsets"])
        expected = torch.Size(shape).numel() * dtype.itemsize
        if end - start != expected:
            raise ValueError(f"'{self.path}': tensor '{key}' spans {end - start} bytes, its shape needs {expected}")
        if end > size:
            raise ValueError(f"'{self.path}' is truncated: tensor '{key}' needs bytes up to {end}, "
                             f"the file has {size}")
        return TensorInfo(dtype, shape, start, end)

    def read(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(self.path, "rb", buffering=0) as f:
            while done < info.nbytes:
                got = os.preadv(f.fileno(), [view[done:]], info.start + done)
                if got <= 0:
                    raise ValueError(f"'{self.path}' is truncated: short read in tensor '{key}'")
                done += got
        return buf.view(info.dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)


class Checkpoint:
    """The safetensors files of a model folder: model.safetensors, or the shards that
    model.safetensors.index.json names (each one checked to exist and to hold its keys)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"shard '{shard}' named in '{index}' is missing")
                files[shard] = SafetensorsFile(folder / shard)
            for key, shard in weight_map.items():
                if key not in files[shard].tensors:
                    raise ValueError(f"'{index}' puts tensor '{key}' in shard '{shard}', which lacks it")
            self.where = {key: files[shard] for key, shard in weight_map.items()}
        elif (folder / WEIGHTS_NAME).is_file():
            single = SafetensorsFile(folder / WEIGHTS_NAME)
            self.where = {key: single for key in single.tensors}
        else:
            raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in '{folder}' "
                                    f"(found: {sorted(p.name for p in folder.iterdir())})")

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def nbytes(self) -> int:
        return sum(f.tensors[k].nbytes for k, f in self.where.items())

    def read(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ValueError(f"tensor '{key}' is missing from the checkpoint in '{self.folder}'")
        return self.where[key].read(key)

    def first_present(self, names: list[str]) -> str:
        """The first of `names` (tied aliases of one tensor) that the checkpoint holds."""
        for name in names:
            if name in self.where:
                return name
        raise ValueError(f"tensor '{names[0]}' is missing from the checkpoint in '{self.folder}'"
                         + (f" (also looked for {names[1:]})" if len(names) > 1 else ""))


# ---- the skeleton and what to put in it ---------------------------------------------------------
def _libc_malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS. Each layer frees a large read buffer and keeps a
    small packed tensor; glibc serves both from its heap once its dynamic mmap threshold has grown,
    and the holes left between packed tensors stay resident: up to ~1 GB for a 1.1B model,
    varying from run to run. malloc_trim(0) after every layer returns them (~1.5 s in all for 154
    layers on a busy 2-core machine); trimming every 4th layer instead let the peak vary by 70 MB."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def read_config(folder: Path):
    """The transformers config of model folder `folder` (its config.json); FileNotFoundError names what is missing."""
    from transformers import AutoConfig

    if not folder.is_dir():
        raise FileNotFoundError(f"model folder '{folder}' not found")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"'{folder / 'config.json'}' not found")
    return AutoConfig.from_pretrained(str(folder))


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model for `config` with every parameter and buffer on the meta device
    (no memory, no initialisation). A quantization_config is dropped first: the layers are ours."""
    from transformers import AutoModelForCausalLM

    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def target_dtype(tensor: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a stored tensor takes in the model: `compute_dtype` for floats, its own otherwise."""
    # Norms too: a float32 norm would hand float32 activations to the plain (bf16) lm_head and
    # break the forward. prepare_for_kbit_training decides what to upcast for training.
    return compute_dtype if tensor.is_floating_point() else tensor.dtype


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name sharing that Parameter (tied embeddings), first name first."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _bnb_targets(ckpt: Checkpoint) -> list[str]:
    """Modules whose weight the checkpoint stores in 4 bits (it has their quant_state key)."""
    suffix = ".weight.quant_state."
    return sorted({k.split(suffix)[0] for k in ckpt.keys() if suffix in k})


def _hqq_targets(ckpt: Checkpoint) -> list[str]:
    """Modules whose weight the checkpoint stores as HQQ codes (it has their W_q key)."""
    return sorted({k[:-len(".W_q")] for k in ckpt.keys() if k.endswith(".W_q") and ".meta_" not in k})


def read_hqq_config(config) -> dict | None:
    """The folder's `quantization_config` as a dict when it describes HQQ (quant_method "hqq"), else None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc if qc.get("quant_method") == "hqq" else None


def _hqq_layer(ckpt: Checkpoint, name: str, linear: nn.Linear, compute_dtype: torch.dtype,
               device: torch.device = CPU) -> AdaptedLinear:
    """An HQQ AdaptedLinear for module `name`, its codes read as stored (the `hqq` package's keys)."""
    prefix = name + "."
    keys = hqq_state_keys(ckpt.keys(), prefix)
    base = hqq_base_from_state_dict({k: ckpt.read(k) for k in keys}, prefix)
    if base.shape != (linear.out_features, linear.in_features):
        raise ValueError(f"tensor '{prefix}W_q' holds a weight of shape {list(base.shape)}, the model expects "
                         f"[{linear.out_features}, {linear.in_features}]")
    base.hqq_state = base.hqq_state.to(device)
    bias = ckpt.read(name + ".bias").to(device) if linear.bias is not None else None
    return AdaptedLinear(base, bias, compute_dtype)


def quantised_layer(ckpt: Checkpoint, name: str, linear: nn.Linear, aliases: list[str], prequantised: bool,
                     quant: dict, compute_dtype: torch.dtype, device: torch.device = CPU) -> AdaptedLinear:
    """A 4-bit AdaptedLinear for module `name` on `device`: read its stored 4-bit state as is (and
    move it there), or read its weight [out, in], move it there and quantise it there (dispatch:
    Triton on CUDA; the same bits as on the CPU). The bias, if any, is read too. Uses about one
    weight of host memory, and on the device about one weight beyond the 4-bit model."""
    nbits = None
    if prequantised:
        prefix = name + ".weight"
        keys = [k for k in ckpt.keys() if k == prefix or k.startswith(prefix + ".")]
        state = QuantState.from_state_dict({k: ckpt.read(k) for k in keys}, prefix).to(device)
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"tensor '{prefix}' has shape {list(state.shape)}, the model expects "
                             f"[{linear.out_features}, {linear.in_features}]")
    else:
        weight = ckpt.read(ckpt.first_present(aliases))
        if tuple(weight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"tensor '{aliases[0]}' has shape {list(weight.shape)}, the model expects "
                             f"{list(linear.weight.shape)}")
        weight = weight.to(device)
        nbits = hqq_nbits(quant["quant_type"])
        if nbits is not None:  # HQQ (quant_type hqq4/hqq3/hqq2): blocksize is the group size
            base = HQQBase.from_weight(weight, nbits, quant["blocksize"])
        else:
            state = quantize_tensor(weight, **quant)
        del weight
    bias = ckpt.read(name + ".bias").to(device) if linear.bias is not None else None
    return AdaptedLinear(base if nbits is not None else Quant4bitBase(state), bias, compute_dtype)


def float32_residual_names(model: nn.Module) -> set[str]:
    """Parameter names a float32 residual stream keeps in float32 (surgery.use_float32_residual,
    switched on by the training run): the input embeddings' (a tied LM head shares them; read in
    float32 only when stored so, see _materialise) and every norm's."""
    names: set[str] = set()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module_name, module in model.named_modules():
        if module is emb or "norm" in type(module).__name__.lower():
            names.update(f"{module_name}.{leaf}" if module_name else leaf
                         for leaf, _ in module.named_parameters(recurse=False))
    return names


def _materialise(model: nn.Module, ckpt: Checkpoint, compute_dtype: torch.dtype, device: torch.device = CPU,
                 float32_names: set[str] = frozenset(), within: str = "") -> None:
    """Replace every meta parameter and persistent buffer by its tensor from the checkpoint on
    `device`, floats cast to `compute_dtype` (there: the host holds one tensor at a time), those
    of `float32_names` (or sharing their Parameter) to float32. Tied names receive one shared Parameter.
    `within`: only names that start with it (one block at a time: qforge.dist.load)."""
    tied = tied_names(model)
    done: dict[str, nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if not param.is_meta or not name.startswith(within):  # an AdaptedLinear's bias is read with its weight
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        names = tied.get(name, [name])
        shared = next((done[n] for n in names if n in done), None)
        if shared is None:
            tensor = ckpt.read(ckpt.first_present(names))
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"tensor '{name}' has shape {list(tensor.shape)}, "
                                 f"the model expects {list(param.shape)}")
            # a float32 residual reads these in float32: norms always (vectors, cheap), the embedding
            # matrix only when stored in float32 (a 16-bit one would gain memory and no value)
            wide = (tensor.is_floating_point() and any(n in float32_names for n in names)
                    and (tensor.dtype == torch.float32 or tensor.dim() < 2))
            tensor = tensor.to(device).to(torch.float32 if wide else target_dtype(tensor, compute_dtype))
            shared = nn.Parameter(tensor, requires_grad=param.requires_grad and tensor.is_floating_point())
            shared._is_hf_initialized = True  # tells transformers' init functions to leave it alone
        module._parameters[leaf] = done[name] = shared
    for name, buf in list(model.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if buf.is_meta and leaf not in module._non_persistent_buffers_set and name in ckpt and name.startswith(within):
            module._buffers[leaf] = ckpt.read(name).to(device).to(target_dtype(buf, compute_dtype))


def _init_computed_buffers(model: nn.Module, device: torch.device = CPU) -> None:
    """Buffers still on meta (non-persistent ones such as rotary inv_freq) get real memory and are
    recomputed by the model's `_init_weights`, as transformers' from_pretrained does; the module's
    loaded parameters carry `_is_hf_initialized`, so they are left as they are."""
    for module_name, module in model.named_modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for k in meta:
            module._buffers[k] = torch.empty_like(module._buffers[k], device=device)
        if hasattr(model, "_init_weights"):
            model._init_weights(module)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"no value for {left[:5]}{' ...' if len(left) > 5 else ''}: not in the checkpoint "
                         "and not computed by the model")


def load_folder(folder: Path, quantize: bool, quant: dict, compute_dtype: torch.dtype,
                target_modules="all-linear", skip_modules=DEFAULT_SKIP, progress: bool = False,
                device: torch.device | str | None = None, keep_float32: bool = False) -> nn.Module:
    """Stream a Hugging Face folder into a model on `device` (default the CPU): target Linear layers
    become 4-bit AdaptedLinear (quantised from the stored weight on the device, or read as stored in
    a bitsandbytes folder and moved there); every other tensor goes there as it is read. Host memory
    holds about one tensor at a time; the device, the 4-bit model plus one layer in the compute dtype.
    keep_float32: the embeddings and norms are read in float32 (their stored values, not rounded to
    the compute dtype first), for a float32 residual stream (surgery.use_float32_residual)."""
    device = torch.device(device) if device is not None else CPU
    config = read_config(folder)
    hqq_folder = read_hqq_config(config) is not None
    prequantised = hqq_folder or read_bnb_config(config) is not None
    model = build_skeleton(config, compute_dtype)
    ckpt = convert_checkpoint(Checkpoint(folder), model)  # transformers' renames and expert merges
    if prequantised and not quantize:
        raise ValueError(f"'{folder}' stores {'HQQ' if hqq_folder else '4-bit'} weights; load it with quantize=True")
    if hqq_folder:
        targets = _hqq_targets(ckpt)
    elif prequantised:
        targets = _bnb_targets(ckpt)
    elif quantize:
        routers = set(router_linear_names(model))  # MoE routers stay dense
        targets = [n for n in select_targets(linear_names(model), target_modules, skip_modules) if n not in routers]
    else:
        targets = []
    tied = tied_names(model)
    for name in progress_bar(targets, progress, "quantising" if not prequantised else "reading 4-bit"):
        linear = _submodule(model, name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"checkpoint stores '{name}' in 4 bits, but the model's '{name}' is not a Linear")
        aliases = tied.get(name + ".weight", [name + ".weight"])
        if hqq_folder:
            set_module(model, name, _hqq_layer(ckpt, name, linear, compute_dtype, device))
        else:
            set_module(model, name, quantised_layer(ckpt, name, linear, aliases, prequantised, quant,
                                                     compute_dtype, device))
        release_free_memory()
    for name in expert_parameter_names(model):  # one fused expert group at a time
        bank = stored_expert_bank(ckpt, name, device) if prequantised else None
        if bank is not None:  # a qforge 4-bit folder: the experts as stored
            place_expert_bank(model, name, bank, compute_dtype)
        else:
            place_expert_parameter(model, name, ckpt.read(name), compute_dtype, device, quant if quantize else None)
        release_free_memory()
    wide = float32_residual_names(model) if keep_float32 else frozenset()
    _materialise(model, ckpt, compute_dtype, device, wide)
    _init_computed_buffers(model, device)
    release_free_memory()
    if (folder / "generation_config.json").is_file():  # eos / pad ids for generate(), as from_pretrained
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the checkpoint stores '{name}.weight' in 4 bits, but the model has no module "
                         f"'{name}'") from None


def progress_bar(items: list, enabled: bool, desc: str):
    """`items`, wrapped in a tqdm bar over layers when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="layer")


# ---- tokenizers, GGUF and the embedded model ----------------------------------------------------
def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it holds no tokenizer files."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def _load_gguf(path: Path, dtype: torch.dtype):
    """(model in `dtype`, tokenizer) through transformers' GGUF loader (dequantises every tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are plain floats now: drop the marker that they came from a GGUF file, or
    # save_pretrained and from_config would treat the model as GGUF-quantised.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """Write GGUF `path` as a Hugging Face folder (config.json, model.safetensors in float32, tokenizer
    with its chat template), atomically. float32 keeps the dequantised GGUF values exactly; bf16
    would round them a second time before they are quantised again."""
    model, tokenizer = _load_gguf(path, torch.float32)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)

    return write_new_folder(out_dir, write)


def _cached(folder: Path, build) -> Path:
    """`folder` once it holds a config.json; otherwise `build(folder)` first (atomic). Two processes
    may build at once: the loser's refusal to overwrite is ignored when the winner's copy is there."""
    if not (folder / "config.json").is_file():
        try:
            build(folder)
        except ValueError:
            if not (folder / "config.json").is_file():
                raise
    return folder


def smollm2_folder() -> Path:
    """The cached float32 Hugging Face copy of the embedded SmolLM2 GGUF (converted on first use, ~20 s)."""
    from ..paths import cache_dir
    from .embedded import smollm2_gguf_path

    return _cached(cache_dir(SMOLLM2_CACHE[0]) / SMOLLM2_CACHE[1], lambda out: convert_gguf(smollm2_gguf_path(), out))


def smollm2_quantized_folder(quant: dict) -> Path:
    """The cached bitsandbytes-format copy of SmolLM2 for one 4-bit setting (all linears but lm_head).
    Built from the float32 copy with every other tensor kept in float32, so loading it in any
    compute dtype gives the same model as quantising the float32 copy directly."""
    from ..paths import cache_dir
    from .checkpoint import save_quantized

    dq = "-dq" if quant["double_quant"] else ""
    name = f"{SMOLLM2_CACHE[1]}-{quant['quant_type']}{dq}-b{quant['blocksize']}-v{QUANT_CACHE_VERSION}"

    def build(out: Path) -> None:
        source = smollm2_folder()
        model = load_folder(source, True, quant, torch.float32)
        save_quantized(model, load_tokenizer(source), out)

    return _cached(cache_dir(SMOLLM2_CACHE[0]) / name, build)


def resolve_source(source, revision: str | None = None):
    """A Hub model id (ORG/NAME, not a local path) becomes its local snapshot folder
    (qforge.model.hub: the cache first, else a download); anything else is returned as it is."""
    from .hub import looks_like_hub_id, resolve_model_id
    if looks_like_hub_id(source):
        return resolve_model_id(source, revision)
    return source


def resolve_path(source, quantize: bool, quant: dict, default_targets: bool) -> tuple[Path, bool]:
    """(path, is_gguf) of a local source: "smollm2" (its cached float32 folder, or with quantize,
    default targets and an nf4/fp4 `quant` its cached bitsandbytes folder), a .gguf file, or a model
    folder (checked to exist). FileNotFoundError / ValueError name what is wrong."""
    if isinstance(source, str) and source.lower() == SMOLLM2:
        if quantize and default_targets and quant["quant_type"] in ("nf4", "fp4"):
            return smollm2_quantized_folder(quant), False
        return smollm2_folder(), False
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file '{path}' not found")
        return path, True
    if not path.exists():
        raise FileNotFoundError(f"model folder '{path}' not found")
    if path.is_file():
        raise ValueError(f"'{path}' is a file; expected a model folder, a .gguf file or '{SMOLLM2}'")
    return path, False


def _load_gguf_model(path: Path, quantize: bool, quant: dict, compute_dtype: torch.dtype,
                     target_modules, skip_modules):
    """A GGUF file, materialised in float32 (the loader needs the whole model), its targets
    quantised from those float32 values, then everything else cast to `compute_dtype`."""
    model, tokenizer = _load_gguf(path, torch.float32)
    if quantize:
        targets = select_targets(linear_names(model), target_modules, skip_modules)
        quantize_linears(model, targets, compute_dtype=compute_dtype, **quant)
    for param in model.parameters():  # tied parameters are one object: cast once
        if param.is_floating_point():
            param.data = param.data.to(compute_dtype)
    return model.eval(), tokenizer


def load_model(source, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
               compute_dtype: torch.dtype = torch.bfloat16, target_modules="all-linear", skip_modules=DEFAULT_SKIP,
               quantize: bool = True, progress: bool = False, device: torch.device | str | None = None,
               revision: str | None = None, keep_float32: bool = False):
    """Load `source` -> (model, tokenizer or None): the skeleton, the checkpoint's keys converted,
    each tensor placed (a target weight quantised) in one pass. No adapters and no training
    switches: the training run (qforge.train.run) adds those.

    `source`: a Hugging Face folder (model.safetensors or sharded with an index), a folder in
    bitsandbytes' 4-bit format (its 4-bit tensors used as stored; quant_type, double_quant,
    blocksize and target_modules are then the folder's), a .gguf file, "smollm2", or a Hugging Face
    Hub id ORG/NAME at `revision` (qforge.model.hub).
    quantize=True: the target Linear layers (`target_modules` minus `skip_modules`) become
    4-bit AdaptedLinear (quant_type, blocksize, double_quant) computing in `compute_dtype`, or with
    quant_type hqq4/hqq3/hqq2 HQQ layers (qforge.nn.HQQBase, blocksize the group size), and a
    folder in HQQ format (quant_method "hqq", see qforge.model.checkpoint) is read as stored; every other
    float tensor is in `compute_dtype`. quantize=False: the plain model in `compute_dtype`.
    `progress` shows a progress bar over the layers being quantised. `device` (resolved by the
    caller, qforge.devices): where the model is built. A folder (and "smollm2") streams onto it:
    each tensor is read from its shard, moved there and, for a target layer, quantised there, so
    neither the host nor the device ever holds the model in 16 bits. A GGUF source is built on
    the CPU (its loader needs the dense model) and then moved.
    `keep_float32`: a folder's embeddings and norms are read in float32 as stored (for a float32
    residual stream; a GGUF source's are cast to `compute_dtype` like the rest).
    """
    quant = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant}
    source = resolve_source(source, revision)
    device = torch.device(device) if device is not None else CPU
    default_targets = target_modules == "all-linear" and tuple(skip_modules) == tuple(DEFAULT_SKIP)
    path, is_gguf = resolve_path(source, quantize, quant, default_targets)
    if is_gguf:
        model, tokenizer = _load_gguf_model(path, quantize, quant, compute_dtype, target_modules, skip_modules)
        return (model.to(device) if device.type != "cpu" else model), tokenizer
    model = load_folder(path, quantize, quant, compute_dtype, target_modules, skip_modules, progress, device,
                        keep_float32)
    return model, load_tokenizer(path)


def load_quantised_base(source, device=None, quant_type: str = "nf4", group_size: int = 64):
    """(model, tokenizer) of a trained adapter's base, quantised as training quantised it (nf4/fp4,
    or hqq4/3/2 with `group_size`), on `device`; float32 compute, so that a merge (float32 anyway)
    rounds the unquantised parameters only once, to its output dtype."""
    return load_model(source, quant_type=quant_type, blocksize=group_size if quant_type.startswith("hqq") else 64,
                      compute_dtype=torch.float32, device=device)
