"""Task Arithmetic, TIES and DARE as configurations of one function over task vectors.

θ = θ_b + λ · combine(sparsify(τ_i) · w_i), τ_i = θ_i − θ_b, where
- ``sparsify``: None (Task Arithmetic), "magnitude" (TIES trim: top-k by |τ|, k = density·numel),
  or "random" (DARE: keep each entry with probability density, rescale survivors by 1/density
  unless ``rescale`` is false);
- ``consensus``: None (plain sum) or "sign" (TIES elect: γ = sgn Σ_i w_i τ̂_i, and only entries
  whose sign agrees with γ are combined; zeros never vote);
- ``normalize``: divide by the sum of the weights that took part (per entry under consensus),
  which turns the TIES disjoint sum into the paper's disjoint mean.

Weights scale τ̂_i *before* the sign election, as mergekit does (the TIES paper has no weights).
"""

from __future__ import annotations

import torch

from mergelab.methods.sparsify import dare_mask, magnitude_mask


def generalized_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float] | None = None,
    normalize: bool = False,
    rescale: bool = True,
    sparsify: str | None = None,
    consensus: str | None = None,
    seed: int = 0,
    key: str = "",
    **scale: float,
) -> torch.Tensor:
    lam = scale.pop("lambda", 1.0)
    if scale:
        raise TypeError(f"unexpected parameters {sorted(scale)}")
    densities = density or [1.0] * len(tensors)
    deltas = []
    for index, (tensor, w, d) in enumerate(zip(tensors, weight, densities)):
        delta = tensor.sub_(base)  # τ_i, reusing the expert's buffer
        if sparsify == "magnitude" and d < 1.0:
            delta.mul_(magnitude_mask(delta, d))
        elif sparsify == "random" and d < 1.0:
            delta.mul_(dare_mask(delta.shape, d, seed, index, key).to(delta.device)).div_(d if rescale else 1.0)
        deltas.append(delta.mul_(w))

    if consensus is None:
        merged = deltas[0]
        for delta in deltas[1:]:
            merged.add_(delta)
        if normalize:
            total = sum(weight)
            merged.div_(total if abs(total) > 1e-12 else 1.0)
    else:
        elected = torch.zeros_like(base)
        for delta in deltas:
            elected.add_(delta)
        elected = torch.where(elected >= 0, 1.0, -1.0).to(torch.int8)  # γ; ties go to +
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for delta, w in zip(deltas, weight):
            agrees = torch.sign(delta).to(torch.int8) == elected  # zeros never agree
            merged.add_(delta * agrees)
            if divisor is not None:
                divisor.add_(agrees, alpha=w)
        del elected
        if divisor is not None:
            divisor[divisor == 0] = 1.0
            merged.div_(divisor)
    return merged.mul_(lam).add_(base)
