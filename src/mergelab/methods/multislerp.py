"""Multi-SLERP (mergekit's 'multislerp', Goddard 2025): a barycentre of N models on the sphere."""

from __future__ import annotations

import torch

from mergelab.errors import MergelabError
from mergelab.methods import sphere
from mergelab.methods.base import weighted_sum


def check_multislerp(params: dict, where: str) -> str | None:
    """Weights that sum to zero cannot be normalized."""
    if params["normalize_weights"] and abs(sum(params["weight"])) < 1e-12:
        return (f"multislerp weights {params['weight']} sum to zero {where} and normalize_weights is on; change "
                f"the weights or set normalize_weights: false")
    return None


def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
               normalize_weights: bool, eps: float) -> torch.Tensor:
    """θ = (Σ w_i |x_i|) · m / |m|,  m = Σ w_i x_i / (|x_i| + eps),  x_i = θ_i (or θ_i − θ_b).

    The recipe: put each flattened tensor on the unit sphere, take the weighted mean m of
    the points, project the points onto the tangent space at m/|m|, average them there with
    the same weights, map back with the exponential map and scale by the weighted mean
    norm. The weighted mean of the tangent projections at m/|m| is zero (m/|m| is their own
    barycentre), so the exponential map returns m/|m| itself: that is the formula above.
    With a base the task vectors are combined and θ_b is added back. Weights are divided by
    their sum when ``normalize_weights``. Two antipodal models whose weights cancel m
    (|m| < eps) are averaged linearly instead; for three or more that is an error, unless
    every x_i is zero (mergekit refuses that case too), which gives zero.

    Example:
        >>> a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> multislerp([a, b], None, weight=[1.0, 1.0], normalize_weights=True, eps=1e-8)
        tensor([1.4142, 1.4142])
    """
    if len(tensors) == 1:
        return tensors[0]
    weights = weight
    if normalize_weights:
        total = sum(weight)
        if abs(total) < 1e-12:
            raise MergelabError(f"multislerp weights {weight} sum to zero and cannot be normalized; change the "
                                f"weights or set normalize_weights: false")
        weights = [w / total for w in weight]
    if base is not None:
        for tensor in tensors:
            tensor.sub_(base)  # task vectors, in place
    norms = [sphere.norm(tensor) for tensor in tensors]
    scales = [w / (norm + eps) for w, norm in zip(weights, norms)]
    mean = weighted_sum(tensors, scales)  # m, the weighted mean of the unit vectors, in tensors[0]
    mean_norm = sphere.norm(mean)
    if mean_norm < eps and not any(norms):
        merged = mean  # every x_i is zero (a tensor no model changed from the base): so is the merge
    elif mean_norm < eps:
        if len(tensors) != 2:
            raise MergelabError(
                f"multislerp: the weighted mean of the {len(tensors)} models' directions is zero (weights "
                f"{weight} cancel opposite tensors); change the weights")
        # linear instead: w_1 x_1 + w_2 x_2, with w_1 x_1 = (m − w_2 x_2/(|x_2| + eps))·(|x_1| + eps)
        merged = mean.sub_(tensors[1], alpha=scales[1]).mul_(norms[0] + eps).add_(tensors[1], alpha=weights[1])
    else:
        merged = mean.mul_(sum(w * norm for w, norm in zip(weights, norms)) / mean_norm)
    return merged.add_(base) if base is not None else merged
