"""PEFT LoRA adapter directories: read and validate one against its base, write one.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
``.bin``, read with the same safe loader as checkpoints). Its tensors are named after the
PEFT-wrapped model (``base_model.model.<module>.lora_A.weight``); stripped of that prefix they
name modules of the base checkpoint:

- ``M.lora_A.weight`` (r, in) and ``M.lora_B.weight`` (out, r): ΔW = scale·B·A is added to
  ``M.weight`` (transposed when the base stores it (in, out), as GPT-2's Conv1D does:
  ``fan_in_fan_out``);
- ``M.lora_embedding_A`` (r, vocab) and ``M.lora_embedding_B`` (dim, r): ΔW = scale·(B·A)ᵀ;
- ``M.lora_magnitude_vector`` (out,): DoRA; the merged row i is m_i·(W + ΔW)_i / ‖(W + ΔW)_i‖;
- ``M.base_layer.weight`` and every other full tensor (``modules_to_save``, trained biases)
  replace the base's tensor of that name.

scale is ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), per module where
``rank_pattern``/``alpha_pattern`` say so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.errors import MergelabError
from mergelab.io import CheckpointReader, TensorInfo

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def require_peft():
    """Import ``peft``, or say how to install it."""
    try:
        import peft
    except ImportError:
        raise MergelabError("this needs the peft library; install it with: pip install 'mergelab[peft]'") from None
    return peft


def is_adapter_dir(path: str | Path) -> bool:
    """True for a directory holding ``adapter_config.json`` (a PEFT adapter)."""
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are and how they combine into ΔW."""

    name: str  # module path in the base checkpoint, e.g. model.layers.0.self_attn.q_proj
    target: str  # the base tensor ΔW is added to: name + ".weight"
    a_key: str
    b_key: str
    rank: int
    scale: float
    kind: str  # "linear" (ΔW = s·B·A), "transposed" (fan_in_fan_out: s·(B·A)ᵀ), "embedding" (s·(B·A)ᵀ)
    magnitude_key: str | None = None  # DoRA


class LoraAdapter:
    """A PEFT LoRA adapter directory, its tensors listed from headers only.

    Args:
        path: the adapter directory.
        label: how messages name it (defaults to the path).

    Example:
        >>> adapter = LoraAdapter("adapters/math")  # doctest: +SKIP
        >>> adapter.base_name, len(adapter.modules)  # doctest: +SKIP
        ('models/base', 14)
    """

    def __init__(self, path: str | Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self.config = read_adapter_config(self.path)
        weights = [self.path / name for name in WEIGHT_FILES if (self.path / name).is_file()]
        if not weights:
            raise MergelabError(f"adapter '{self.label}': {self.path} has {CONFIG_FILE} but no weights "
                                f"({' or '.join(WEIGHT_FILES)}); re-save the adapter")
        self.reader = CheckpointReader(weights[0], label=f"adapter {self.label}")
        self.file = weights[0]
        try:
            self.modules, self.replaced = self._sort_tensors()
        except BaseException:
            self.reader.close()
            raise

    @property
    def base_name(self) -> str | None:
        """The base model the adapter was trained on (``base_model_name_or_path``)."""
        return self.config.get("base_model_name_or_path") or None

    def _sort_tensors(self) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """(adapted modules by base tensor name, full replacement tensors: base name -> adapter key)."""
        parts: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        for key in self.reader.tensors:
            name = key.removeprefix(PREFIX)
            part = next((p for p in _LORA_PARTS if name.endswith("." + p)), None)
            if part is not None:
                parts.setdefault(name[: -len(part) - 1], {})[part] = key
            elif ".lora_" in name:
                raise MergelabError(f"adapter '{self.label}': tensor '{key}' is a LoRA part mergelab does not know "
                                    f"(lora_bias and other variants are not supported); re-train with a plain LoRA")
            else:  # modules_to_save, trained biases, embedding layers saved whole
                replaced[name.replace(".base_layer.", ".")] = key
        modules = {}
        for name, found in parts.items():
            modules[name + ".weight"] = self._module(name, found)
        return modules, replaced

    def _module(self, name: str, found: dict[str, str]) -> LoraModule:
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_part not in found or b_part not in found:
            missing = a_part if a_part not in found else b_part
            raise MergelabError(f"adapter '{self.label}': module '{name}' has no {missing}; the adapter is "
                                f"incomplete, re-save it")
        a_shape, b_shape = self.reader.tensors[found[a_part]].shape, self.reader.tensors[found[b_part]].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise MergelabError(f"adapter '{self.label}': module '{name}' has {a_part} {a_shape} and {b_part} "
                                f"{b_shape}, which do not multiply (B·A needs B's columns = A's rows); only 2-D "
                                f"LoRA factors are supported")
        rank = a_shape[0]
        if "lora_magnitude_vector" in found and embedding:
            raise MergelabError(f"adapter '{self.label}': module '{name}' is a DoRA embedding, which mergelab "
                                f"does not merge; use DoRA on linear layers only")
        kind = "embedding" if embedding else ("transposed" if self.config.get("fan_in_fan_out") else "linear")
        return LoraModule(name, name + ".weight", found[a_part], found[b_part], rank, self._scale(name, rank),
                          kind, found.get("lora_magnitude_vector"))

    def _scale(self, name: str, rank: int) -> float:
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, name, self.config.get("lora_alpha", 8))
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise MergelabError(f"adapter '{self.label}': lora_alpha {alpha!r} is not a number; fix {CONFIG_FILE}")
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def check_against(self, tensors: dict[str, TensorInfo], base_label: str,
                      tied_embeddings: bool = False) -> dict[str, LoraModule]:
        """Check every adapted module and replaced tensor against the base's tensors; return
        the modules with their orientation fixed from the base's shapes (Conv1D stores (in, out)).
        With ``tied_embeddings`` a saved tensor the base does not store (a tied output layer) is dropped."""
        checked = {}
        for target, module in self.modules.items():
            info = tensors.get(target)
            if info is None:
                raise MergelabError(
                    f"adapter '{self.label}' adapts module '{module.name}', but base model '{base_label}' has no "
                    f"tensor '{target}'; use the base the adapter was trained on ({self.base_name or 'unknown'})")
            out_dim = self.reader.tensors[module.b_key].shape[0]
            in_dim = self.reader.tensors[module.a_key].shape[1]
            normal, transposed = (out_dim, in_dim), (in_dim, out_dim)
            if module.kind == "embedding":
                fits = info.shape == transposed
            elif out_dim == in_dim:  # square: only the config's fan_in_fan_out can tell
                fits = info.shape == normal
            else:  # the base's layout decides: Conv1D stores (in, out) whatever the config says
                fits = info.shape in (normal, transposed)
                kind = "linear" if info.shape == normal else "transposed"
                module = LoraModule(module.name, module.target, module.a_key, module.b_key, module.rank,
                                    module.scale, kind, module.magnitude_key)
            if not fits:
                raise MergelabError(
                    f"adapter '{self.label}': module '{module.name}' has LoRA factors for a {out_dim}x{in_dim} "
                    f"weight but base model '{base_label}' has '{target}' of shape {info.shape}; use the base the "
                    f"adapter was trained on ({self.base_name or 'unknown'})")
            if not info.dtype.is_floating_point:
                raise MergelabError(f"adapter '{self.label}' adapts '{target}', which is {info.dtype} in base model "
                                    f"'{base_label}' (quantized?); use an unquantized base")
            if module.magnitude_key is not None:
                rows = out_dim
                if self.reader.tensors[module.magnitude_key].shape != (rows,):
                    raise MergelabError(f"adapter '{self.label}': DoRA magnitude of '{module.name}' has shape "
                                        f"{self.reader.tensors[module.magnitude_key].shape}, expected ({rows},)")
            checked[target] = module
        for name, key in list(self.replaced.items()):
            info = tensors.get(name)
            own = self.reader.tensors[key]
            if info is None and tied_embeddings:  # the output layer's copy of a tied embedding: it follows that
                del self.replaced[name]
                continue
            if info is None:
                raise MergelabError(f"adapter '{self.label}' saves tensor '{name}' (modules_to_save), but base model "
                                    f"'{base_label}' has no such tensor; use the base the adapter was trained on")
            if info.shape != own.shape:
                raise MergelabError(f"adapter '{self.label}' saves tensor '{name}' with shape {own.shape}, but base "
                                    f"model '{base_label}' has {info.shape}; use the base the adapter was trained on")
        return checked

    def delta(self, module: LoraModule, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW of one module, in the layout of the base tensor it is added to."""
        a = self.reader.get(module.a_key).to(dtype)  # (r, in)
        b = self.reader.get(module.b_key).to(dtype)  # (out, r)
        delta = (b @ a).mul_(module.scale)  # (out, in)
        return delta if module.kind == "linear" else delta.T

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def apply_lora(weight: torch.Tensor, adapter: LoraAdapter, module: LoraModule) -> torch.Tensor:
    """W + ΔW (or DoRA's m·(W + ΔW)/‖W + ΔW‖ per output row), computed in float32 and returned
    in W's dtype, as PEFT's ``merge_and_unload`` does."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return add_lora_(weight.to(compute, copy=True), adapter, module).to(weight.dtype)


def add_lora_(merged: torch.Tensor, adapter: LoraAdapter, module: LoraModule) -> torch.Tensor:
    """``apply_lora`` in place on a float32/float64 copy of W: one fused W + scale·B·A (addmm)."""
    rows = merged if module.kind == "linear" else merged.T  # (out, in)
    a = adapter.reader.get(module.a_key).to(merged.dtype)  # (r, in)
    b = adapter.reader.get(module.b_key).to(merged.dtype)  # (out, r)
    if module.kind == "embedding":  # ΔW = s·(B·A)ᵀ on a (vocab, dim) weight: rows = W (vocab, dim)
        merged.addmm_(a.T, b.T, alpha=module.scale)
    else:
        rows.addmm_(b, a, alpha=module.scale)
    if module.magnitude_key is not None:
        magnitude = adapter.reader.get(module.magnitude_key).to(merged.dtype)  # (out,)
        factor = magnitude / torch.linalg.norm(rows, dim=1)
        rows.mul_(factor.unsqueeze(1))
    return merged


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha patterns: a key matches a module name it ends (a regex, at a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def read_adapter_config(path: Path) -> dict:
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise MergelabError(f"{path} is not a PEFT adapter directory ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MergelabError(f"{config_path} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise MergelabError(f"{config_path} is not a JSON object; re-save the adapter")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise MergelabError(f"{config_path}: peft_type is {kind}; mergelab reads LoRA adapters only (peft_type LORA)")
    if config.get("target_parameters"):
        raise MergelabError(f"{config_path}: target_parameters (LoRA on nn.Parameter) is not supported; "
                            f"target modules instead")
    return config


def write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (keys already prefixed)."""
    from safetensors.torch import save_file

    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHT_FILES[0]),
              metadata={"format": "pt"})


def adapter_config(base_name: str | None, rank: int, alpha: float, target_modules: list[str],
                   modules_to_save: list[str] | None = None, fan_in_fan_out: bool = False,
                   rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                   task_type: str | None = None) -> dict:
    """A minimal LoRA ``adapter_config.json`` that ``PeftModel.from_pretrained`` reads."""
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(target_modules),
                             modules_to_save=modules_to_save or None, fan_in_fan_out=fan_in_fan_out,
                             rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                             task_type=task_type, base_model_name_or_path=base_name, inference_mode=True)
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
