"""Reinforced Agent Merging (RAM, arXiv:2601.13572) and mergekit's tensor-local RAM+.

Per entry of one tensor, an expert *touches* it when |τ_i| > ``epsilon`` (τ_i = θ_i − θ_b).
Entries no expert touches keep the base value; an entry touched by exactly one expert takes
that expert's τ_i whole (RL task vectors are sparse: averaging would dilute it); an entry
touched by several takes the mean of their τ_i. Untouched values below ``epsilon`` never enter.

RAM+ (``ramplus_tl``) scales each expert's unique entries by λ_i = 1 + r·clip(ρ_i, 0, α), where
ρ_i = (entries it shares) / (entries it alone touches), counted in this tensor ("tensor-local",
as mergekit implements it; the paper counts over the whole model).
"""

from __future__ import annotations

import torch


def ram(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """θ_b + Σ_i τ_i·[touched_i]·(1 if unique else 1/count)."""
    return _reinforced(tensors, base, epsilon, r=0.0, alpha=0.0)


def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float, r: float,
               alpha: float) -> torch.Tensor:
    """RAM with each expert's unique entries scaled by λ_i = 1 + r·clip(ρ_i, 0, α)."""
    return _reinforced(tensors, base, epsilon, r=r, alpha=alpha)


def _reinforced(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float, r: float,
                alpha: float) -> torch.Tensor:
    deltas = [tensor.sub_(base) for tensor in tensors]  # τ_i, in the experts' own buffers
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)  # experts touching each entry
    for delta in deltas:
        count.add_(delta.abs() > epsilon)
    unique = count == 1  # bool
    inverse = count.clamp_(min=1).to(base.dtype).reciprocal_()  # 1/count: the mean over the experts that share
    del count
    merged = torch.zeros_like(base)
    for index, delta in enumerate(deltas):
        touched = delta.abs() > epsilon  # bool
        scale = 1.0
        if r:
            alone = int((touched & unique).sum())
            shared = int(touched.sum()) - alone
            rho = shared / max(alone, epsilon)
            scale = 1.0 + r * min(max(rho, 0.0), alpha)
        # unique entries count once (times λ_i); shared ones are divided by how many share them
        share = inverse.masked_fill(unique, scale)
        merged.addcmul_(delta.mul_(touched), share)
        deltas[index] = tensors[index] = delta = None  # release as we go
    return merged.add_(base)
