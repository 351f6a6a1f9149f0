"""LoRA extraction: a PEFT adapter that approximates a full fine-tune of a base model.

For each linear layer (``nn.Linear``, GPT-2's ``Conv1D``) the task vector ΔW = W_ft − W_base
is factored by a truncated SVD, ΔW ≈ U_r·S_r·V_rᵀ, and stored as B = U_r·S_r, A = V_rᵀ with
lora_alpha = r (scale 1). The rank is fixed (``rank``) or chosen per layer as the smallest that
keeps a share ``energy`` of ‖ΔW‖²_F. Large matrices at a fixed rank use a randomized SVD
(``torch.svd_lowrank``). Embeddings and other layers (norms) that changed are saved whole
(``modules_to_save``), and changed biases of linear layers as PEFT's ``bias="all"`` does.

Tensors are read one name at a time from both checkpoints; only the (small) factors are kept.
The relative reconstruction error ‖ΔW − B·A‖_F / ‖ΔW‖_F of every layer is reported; it is the
SVD tail √(Σ_{i>r} σ_i²) / ‖ΔW‖_F.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergelab.adapters.peft_dir import CONFIG_FILE, PREFIX, WEIGHT_FILES, adapter_config
from mergelab.adapters.reader import open_reader
from mergelab.engine import Source, check_tensors
from mergelab.errors import MergelabError
from mergelab.io import SAFE_SINGLE, ShardedWriter
from mergelab.outdir import atomic_directory, check_output_dir

# Above this many entries (and a rank well below the matrix' size) a fixed-rank SVD is randomized.
RANDOMIZED_ABOVE = 1_000_000
OVERSAMPLE, POWER_ITERATIONS = 10, 2
REPORT_FILE = "extraction.json"


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]
    rank: int
    relative_error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F
    randomized: bool


def extract_lora(finetuned: str | Path, base: str | Path, out_dir: str | Path, rank: int | None = None,
                 energy: float | None = None, force: bool = False, quiet: bool = True,
                 tolerance: float = 0.0) -> dict:
    """Write a PEFT LoRA adapter that turns ``base`` into (approximately) ``finetuned``.

    Args:
        finetuned: the fully fine-tuned model (path, Hub id, or BASE+ADAPTER).
        base: the model it was fine-tuned from.
        out_dir: the adapter directory to create (it appears only when everything succeeded).
        rank: the LoRA rank of every layer (capped at the layer's smaller dimension), or
        energy: instead of ``rank``, keep per layer the fewest singular values whose squares sum
            to this share (0 < energy ≤ 1) of ‖ΔW‖²_F.
        force: replace ``out_dir`` if it exists.
        quiet: no progress bar.
        tolerance: a tensor whose largest change is at most this is treated as unchanged.

    Returns:
        The report (also written to ``extraction.json`` in the adapter): per-module rank and
        relative error, the modules saved whole, and the overall relative error.

    Example:
        >>> report = extract_lora("models/math-ft", "models/base", "adapters/math", rank=64)  # doctest: +SKIP
        >>> report["overall_relative_error"]  # doctest: +SKIP
    """
    if (rank is None) == (energy is None):
        raise MergelabError("give either --rank or --energy (not both)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergelabError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise MergelabError(f"--energy must be in (0, 1], got {energy}")
    with open_reader(base, label=str(base)) as base_reader, open_reader(finetuned, label=str(finetuned)) as ft_reader:
        check_output_dir(out_dir, force, inputs=[base_reader.path, ft_reader.path])
        check_tensors([Source(str(base), base_reader, {}), Source(str(finetuned), ft_reader, {})])
        kinds = _module_kinds(base_reader)
        factors: dict[str, torch.Tensor] = {}
        modules: list[ModuleReport] = []
        saved: set[str] = set()  # modules_to_save
        biases: dict[str, str] = {}  # output key -> tensor name
        total = residual = 0.0
        names = [n for n, info in base_reader.tensors.items() if info.dtype.is_floating_point]
        buffers = _Buffers()
        for name in tqdm(names, unit="tensor", desc="extract", disable=quiet):
            module, _, attr = name.rpartition(".")
            kind = kinds.get(module) or _guess_kind(base_reader.tensors[name].shape, attr)
            delta = _task_vector(base_reader, ft_reader, name, buffers)
            if delta.numel() == 0 or max(-float(delta.min()), float(delta.max())) <= tolerance:
                continue
            if kind in ("linear", "conv1d") and attr == "weight":
                matrix = delta if kind == "linear" else delta.T  # (out, in)
                b, a, report, norm_sq = _factor(module, matrix, rank, energy)
                factors[f"{PREFIX}{module}.lora_A.weight"] = a
                factors[f"{PREFIX}{module}.lora_B.weight"] = b
                modules.append(report)
                total, residual = total + norm_sq, residual + norm_sq * report.relative_error ** 2
            elif kind in ("linear", "conv1d"):  # a trained bias of a linear layer
                biases[name] = name
            else:  # embeddings, norms and anything else: the whole module
                saved.add(module)
        for name in list(biases):
            module = name.rpartition(".")[0]
            adapted = f"{PREFIX}{module}.lora_A.weight" in factors
            biases[name] = f"{PREFIX}{module}.base_layer.bias" if adapted else PREFIX + name
        if not factors and not saved and not biases:
            raise MergelabError(f"model '{finetuned}' does not differ from base '{base}'; there is nothing to extract")
        report = {
            "finetuned": str(finetuned), "base": str(base), "rank": rank, "energy": energy,
            "modules": [asdict(m) for m in modules], "modules_to_save": sorted(saved), "biases": sorted(biases),
            "overall_relative_error": math.sqrt(residual / total) if total else 0.0,
        }
        tied = bool((base_reader.config or {}).get("tie_word_embeddings")) and any(
            kinds.get(m) == "embedding" for m in saved)
        conv1d = any(kinds.get(m.name) == "conv1d" for m in modules)
        config = _config(base, modules, sorted(saved), bool(biases), rank, conv1d, tied)
        whole = {PREFIX + name: name for name in base_reader.tensors
                 if name.rpartition(".")[0] in saved} | {key: name for name, key in biases.items()}
        if tied:  # PEFT ties the output layer's saved copy to the embedding's: it expects both
            whole |= {PREFIX + k.removeprefix("tied:"): owner for k, owner in kinds.items()
                      if k.startswith("tied:") and owner.rpartition(".")[0] in saved}
        entries = [(k, tuple(v.shape), v.dtype) for k, v in factors.items()]
        entries += [(key, ft_reader.tensors[name].shape, ft_reader.tensors[name].dtype) for key, name in whole.items()]
        with atomic_directory(out_dir, force, inputs=[base_reader.path, ft_reader.path]) as tmp:
            writer = ShardedWriter(tmp, entries, shard_size=2**62)
            try:
                for key, value in factors.items():
                    writer.write(key, value)
                for key, name in whole.items():  # one full tensor at a time
                    writer.write(key, ft_reader.get(name))
            finally:
                writer.close()
            writer.finish()
            (tmp / SAFE_SINGLE).rename(tmp / WEIGHT_FILES[0])
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


class _Buffers:
    """Reused read and compute buffers: a fresh multi-hundred-MB tensor per read costs a page
    fault per 4 KB page, more than the arithmetic on it."""

    def __init__(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.work = torch.empty(0, dtype=torch.uint8)

    def take(self, kind: str, nbytes: int) -> torch.Tensor:
        if getattr(self, kind).numel() < nbytes:
            setattr(self, kind, torch.empty(nbytes, dtype=torch.uint8))
        return getattr(self, kind)[:nbytes]


def _task_vector(base_reader, ft_reader, name: str, buffers: _Buffers) -> torch.Tensor:
    """θ_ft − θ_base of one tensor in float32, in the reused work buffer (valid until the next call)."""
    info = base_reader.tensors[name]
    numel = math.prod(info.shape)
    delta = buffers.take("work", numel * 4).view(torch.float32).view(info.shape)
    ft_info = ft_reader.tensors[name]
    delta.copy_(ft_reader.get(name, out=buffers.take("raw", numel * ft_info.dtype.itemsize)))
    return delta.sub_(base_reader.get(name, out=buffers.take("raw", numel * info.dtype.itemsize)))


def _factor(module: str, matrix: torch.Tensor, rank: int | None, energy: float | None):
    """(B, A, report, ‖ΔW‖²) of one layer's ΔW (out, in)."""
    smaller = min(matrix.shape)
    norm_sq = float(torch.linalg.vector_norm(matrix)) ** 2
    randomized = rank is not None and matrix.numel() > RANDOMIZED_ABOVE and rank + OVERSAMPLE < smaller // 2
    if randomized:
        u, s, v = torch.svd_lowrank(matrix, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
        keep = rank
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        if rank is not None:
            keep = min(rank, smaller)
        else:
            shares = torch.cumsum(s.double().square(), 0) / max(norm_sq, 1e-300)
            keep = min(int(torch.searchsorted(shares, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1, smaller)
    b = (u[:, :keep] * s[:keep]).contiguous()  # (out, r)
    a = vh[:keep].contiguous()  # (r, in)
    # Measured, not taken from ‖ΔW‖² − Σ σ_i² (the tail by theory, but a difference of two
    # float32 sums: at full rank it would report √ε instead of ε).
    residual = torch.addmm(matrix, b, a, alpha=-1.0)  # (out, in)
    error = float(torch.linalg.vector_norm(residual)) / math.sqrt(norm_sq) if norm_sq else 0.0
    return b, a, ModuleReport(module, tuple(matrix.shape), keep, error, randomized), norm_sq


def _module_kinds(reader) -> dict[str, str]:
    """Module name -> "linear", "conv1d", "embedding" or "other", from the base's architecture
    built on the meta device (no memory, no weights read); empty when it cannot be built."""
    if not reader.config:
        return {}
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        config = transformers.AutoConfig.for_model(**reader.config)
        architecture = (reader.config.get("architectures") or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        with torch.device("meta"):
            model = (model_class or transformers.AutoModelForCausalLM)._from_config(config)
    except Exception:  # an architecture this transformers does not know: fall back to shapes
        return {}
    kinds = {}
    owners = {}  # a tied parameter (lm_head.weight) -> the tensor the checkpoint stores (embed_tokens.weight)
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = owners.setdefault(id(param), name)
        if owner != name and name not in reader.tensors:
            kinds["tied:" + name] = owner
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        else:
            kinds[name] = "other"
    return kinds


def _guess_kind(shape: tuple[int, ...], attr: str) -> str:
    return "linear" if len(shape) == 2 and attr == "weight" else "other"


def _config(base, modules: list[ModuleReport], saved: list[str], biases: bool, rank: int | None,
            conv1d: bool, tied: bool) -> dict:
    ranks = [m.rank for m in modules]
    common = rank if rank is not None else (max(set(ranks), key=ranks.count) if ranks else 8)
    # rank_pattern/alpha_pattern for layers whose rank differs, so that every scale is 1
    pattern = {re.escape(m.name): m.rank for m in modules if m.rank != common}
    config = adapter_config(str(base), common, common, [m.name for m in modules], modules_to_save=saved or None,
                            fan_in_fan_out=conv1d, rank_pattern=pattern, alpha_pattern=dict(pattern))
    if biases:
        config["bias"] = "all"
    if tied:  # a saved embedding must stay tied to the output layer, as in the fine-tune
        config["ensure_weight_tying"] = True
    return config
