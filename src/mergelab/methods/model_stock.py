"""Model Stock (Jang et al. 2024): average the experts, then pull toward the base by how
much their task vectors agree."""

from __future__ import annotations

import itertools

import torch


def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """θ = t·avg(θ_i) + (1−t)·θ_b  =  θ_b + t·avg(τ_i),  t = N·cos / (1 + (N−1)·cos).

    cos is the mean pairwise cosine between task vectors τ_i = θ_i − θ_b over the whole
    tensor, or per output row with ``filter_wise``. cos is clamped to [0, 1], so t stays in
    [0, 1]: experts that disagree completely give back the base.
    """
    n = len(tensors)
    rows = base.shape[0] if filter_wise and base.dim() > 1 else 1
    task_vectors = [tensor.sub_(base).reshape(rows, -1) for tensor in tensors]  # views, (rows, cols)
    norms = [tv.norm(dim=1) for tv in task_vectors]  # (rows,) each
    cosines = []
    for i, j in itertools.combinations(range(n), 2):
        dot = (task_vectors[i] * task_vectors[j]).sum(dim=1)
        denom = norms[i] * norms[j]
        cosines.append(torch.where(denom > 0, dot / denom.clamp_min(1e-30), torch.ones_like(dot)))
    cosine = torch.stack(cosines).mean(dim=0).clamp(0.0, 1.0)  # (rows,)
    ratio = n * cosine / (1.0 + (n - 1) * cosine)  # t, (rows,)
    mean_delta = tensors[0]
    for tensor in tensors[1:]:
        mean_delta.add_(tensor)
    mean_delta.div_(n)
    if rows > 1:
        mean_delta.mul_(ratio.to(base.dtype).reshape((rows,) + (1,) * (base.dim() - 1)))
    else:
        mean_delta.mul_(float(ratio.item()))
    return mean_delta.add_(base)
