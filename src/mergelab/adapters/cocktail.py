"""LM-Cocktail's resilient model written as one adapter (``--output adapter``).

When the fine-tuned model and the candidates are adapters of one base (the base itself may be a
candidate: its ΔW is zero), M_r = α·M_t + (1−α)·Σ w_i·M_i is the base plus

    ΔW_r = α·ΔW_t + (1−α)·Σ w_i·ΔW_i      (Σ w_i = 1)

which is written as a PEFT adapter: one adapter rescaled exactly, several combined by PEFT's
``svd`` (ΔW_r refactored by a truncated SVD to the largest input rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mergelab.adapters.loading import adapter_parts
from mergelab.errors import MergelabError


def check_cocktail_adapter(finetuned, candidates: Sequence[str]) -> Path:
    """Every model must be an adapter of one base, or that base; returns the base."""
    bases, plain = set(), []
    for model in ([finetuned] if finetuned is not None else []) + list(candidates):
        parts = adapter_parts(model)
        if parts is None:
            plain.append(str(model))
        else:
            bases.add(parts[0].resolve())
    if not bases:
        raise MergelabError("--output adapter needs adapters (PEFT adapter directories) among the models; all of "
                            "them are full models")
    if len(bases) > 1:
        raise MergelabError(f"--output adapter needs adapters of one base; they name {len(bases)} bases "
                            f"({', '.join(map(str, sorted(bases)))})")
    base = next(iter(bases))
    for model in plain:
        if Path(model).resolve() != base:
            raise MergelabError(f"--output adapter: model {model} is a full model, not an adapter of {base} (nor "
                                f"that base); write a full model instead (--output model)")
    return base


def cocktail_adapter(finetuned, candidates: Sequence[str], weights: Sequence[float], alpha: float | None,
                     out_dir: str | Path, force: bool = False) -> Path:
    """Write ΔW_r (see the module docstring) as a PEFT adapter in ``out_dir``."""
    from mergelab.adapters.combine import merge_adapters
    from mergelab.adapters.peft_dir import LoraAdapter

    base = check_cocktail_adapter(finetuned, candidates)
    shares = list(zip(candidates, weights)) if finetuned is None else (
        [(finetuned, alpha)] + [(m, (1 - alpha) * w) for m, w in zip(candidates, weights)])
    adapters, adapter_weights = [], []
    for model, weight in shares:
        parts = adapter_parts(model)
        if parts is not None:  # the base itself adds nothing
            adapters.append(parts[1])
            adapter_weights.append(float(weight))
    ranks = set()
    for path in adapters:
        with LoraAdapter(path) as adapter:
            ranks.add(max(module.rank for module in adapter.modules.values()))
    combination = "linear" if len(adapters) == 1 else "svd"
    return merge_adapters(adapters, adapter_weights, out_dir, combination=combination, svd_rank=max(ranks),
                          force=force, base_name=str(base))
