"""Model Stock (Jang et al. 2024): average the experts, then pull toward the base by how
much their task vectors agree."""

from __future__ import annotations

import itertools

import torch


NORM_FLOOR = 1e-6  # mergekit divides by max(‖τ_i‖·‖τ_j‖, 1e-6): (near-)zero task vectors count as orthogonal


def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool,
                cosine_floor: float) -> torch.Tensor:
    """θ = t·avg(θ_i) + (1−t)·θ_b  =  θ_b + t·avg(τ_i),  t = N·cos / (1 + (N−1)·cos).

    cos is the mean pairwise cosine between task vectors τ_i = θ_i − θ_b over the whole
    tensor, or per output row with ``filter_wise``; each pair's cosine divides by
    max(‖τ_i‖·‖τ_j‖, 1e-6), as mergekit does. The mean is floored at ``cosine_floor``:
    at 0 (the default) t stays in [0, 1] and experts that disagree completely give back the
    base; at −1 nothing is floored, as in mergekit.
    """
    n = len(tensors)
    rows = base.shape[0] if filter_wise and base.dim() > 1 else 1
    task_vectors = [tensor.sub_(base).reshape(rows, -1) for tensor in tensors]  # views, (rows, cols)
    norms = [tv.norm(dim=1) for tv in task_vectors]  # (rows,) each
    cosines = []
    for i, j in itertools.combinations(range(n), 2):
        dot = (task_vectors[i] * task_vectors[j]).sum(dim=1)
        cosines.append((dot / (norms[i] * norms[j]).clamp_min(NORM_FLOOR)).clamp(-1.0, 1.0))
    cosine = torch.stack(cosines).mean(dim=0).clamp(min=cosine_floor)  # (rows,)
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


def model_stock_notes(params: dict, numel: int) -> list[str]:
    """The plan-time note when the cosine floor differs from mergekit's (none)."""
    if params["cosine_floor"] > -1.0:
        return [f"the mean task-vector cosine is floored at {params['cosine_floor']:g}, so experts that disagree "
                f"give back the base, where mergekit does not floor it (t < 0 for negative cosines); set "
                f"cosine_floor: -1 for mergekit's"]
    return []
