"""NearSwap (mergekit's 'nearswap', alchemonaut 2024): take the other model's value where it is
already close to the base's, keep the base's where they differ."""

from __future__ import annotations

import torch

MIN_DIFFERENCE = 1e-6  # |θ_b − θ_1| is clamped here, so equal entries get weight 1 (when t > 0)


def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """θ = θ_b + w ⊙ (θ_1 − θ_b),  w = clamp(t / max(|θ_1 − θ_b|, 1e-6), 0, 1), entry by entry.

    Entries that differ by at most ``t`` are swapped for the other model's, entries that differ
    by more move toward it by t/|difference|; t = 0 returns the base.

    Example:
        >>> base, other = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.05, 0.2, -1.0])
        >>> nearswap([other], base, t=0.1)  # 0.05 swapped; 0.2 and -1 move by 0.1
        tensor([ 0.0500,  0.1000, -0.1000])
    """
    difference = tensors[0].sub_(base)  # θ_1 − θ_b, in place
    weight = difference.abs().clamp_min_(MIN_DIFFERENCE).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return difference.mul_(weight).add_(base)
