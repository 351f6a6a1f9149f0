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


CHUNK = 1 << 20  # entries per block: the per-entry counts, masks and shares live one block at a time


def _reinforced(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float, r: float,
                alpha: float) -> torch.Tensor:
    """Block by block over the flattened tensors, so that only the N task vectors and the base
    are whole tensors (the result is written into the first task vector's buffer once each block
    is done with it); the per-entry arithmetic is that of whole-tensor masks."""
    deltas = [tensor.sub_(base).reshape(-1) for tensor in tensors]  # τ_i, in the experts' own buffers
    flat_base = base.reshape(-1)
    blocks = [slice(start, start + CHUNK) for start in range(0, flat_base.numel(), CHUNK)]
    scales = [1.0] * len(deltas)
    masks: list[list[torch.Tensor]] = []  # RAM+: each block's touched masks, kept from the counting pass (bool)
    if r:  # λ_i from the counts of entries expert i touches alone and shares, over the whole tensor
        alone, touched_total = [0] * len(deltas), [0] * len(deltas)
        for block in blocks:
            touched = [delta[block].abs() > epsilon for delta in deltas]
            masks.append(touched)
            unique = torch.stack(touched).sum(0) == 1
            for index, mask in enumerate(touched):
                alone[index] += int((mask & unique).sum())
                touched_total[index] += int(mask.sum())
        for index in range(len(deltas)):
            rho = (touched_total[index] - alone[index]) / max(alone[index], epsilon)
            scales[index] = 1.0 + r * min(max(rho, 0.0), alpha)
    for number, block in enumerate(blocks):
        touched = masks[number] if masks else [delta[block].abs() > epsilon for delta in deltas]
        count = torch.zeros(touched[0].shape, dtype=torch.int32, device=base.device)  # experts touching each entry
        for mask in touched:
            count.add_(mask)
        unique = count == 1
        inverse = count.clamp_(min=1).to(base.dtype).reciprocal_()  # 1/count: the mean over the experts that share
        merged = torch.zeros_like(flat_base[block])
        shares: dict[float, torch.Tensor] = {}  # one share tensor per distinct λ (RAM: one in all)
        for delta, mask, scale in zip(deltas, touched, scales):
            # unique entries count once (times λ_i); shared ones are divided by how many share them
            share = shares.get(scale)
            if share is None:
                share = shares[scale] = inverse.masked_fill(unique, scale)
            merged.addcmul_(delta[block].mul(mask), share)
        if masks:
            masks[number] = []  # release this block's masks
        deltas[0][block] = merged.add_(flat_base[block])
    result = deltas[0].reshape(base.shape)
    tensors.clear()
    return result
