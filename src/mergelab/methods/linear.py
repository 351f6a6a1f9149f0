"""Weighted averages: Averaging / Model Soups, LM-Cocktail (Eq. 1), Fisher merging."""

from __future__ import annotations

from typing import Callable

import torch

from mergelab.errors import MergelabError
from mergelab.methods.base import weighted_sum


def _normalized(weights: list[float], what: str) -> list[float]:
    total = sum(weights)
    if abs(total) < 1e-12:
        raise MergelabError(f"{what} weights {weights} sum to zero and cannot be normalized; change the weights")
    return [w / total for w in weights]


def normalize_check(method: str) -> Callable[[dict, str], str | None]:
    """The plan-time rule of every method with ``normalize``: weights that sum to zero cannot be
    divided by their sum."""

    def check(params: dict, where: str) -> str | None:
        if params["normalize"] and abs(sum(params["weight"])) < 1e-12:
            return (f"{method} weights {params['weight']} sum to zero {where} and normalize is on; change the "
                    f"weights or set normalize: false")
        return None

    return check


check_linear = normalize_check("linear")


def check_lm_cocktail(params: dict, where: str) -> str | None:
    if sum(params["weight"][1:]) <= 0:
        return (f"lm_cocktail: the weights of the models after the first sum to zero {where}; give at least one "
                f"candidate a positive weight")
    return None


def check_fisher(params: dict, where: str) -> str | None:
    if sum(params["weight"]) <= 0:
        return f"fisher weights {params['weight']} sum to zero {where}; give a model a positive weight"
    return None


def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
           normalize: bool) -> torch.Tensor:
    """θ = Σ w_i θ_i, with w divided by Σ w when ``normalize`` (Wortsman et al., Model Soups)."""
    weights = _normalized(weight, "linear") if normalize else weight
    return weighted_sum(tensors, weights)


def lm_cocktail(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
                alpha: float) -> torch.Tensor:
    """LM-Cocktail Eq. 1: M_r = α·M_t + (1−α)·Σ w_i M_i.

    ``tensors[0]`` is the fine-tuned model M_t; the others are the candidates M_i, whose
    weights are normalized to sum to one (the weight given to M_t itself is ignored).
    """
    if len(tensors) < 2:
        raise MergelabError("lm_cocktail needs the fine-tuned model followed by at least one other model")
    mixed = weighted_sum(tensors[1:], _normalized(weight[1:], "lm_cocktail candidate"))
    return mixed.mul_(1.0 - alpha).add_(tensors[0], alpha=alpha)


def fisher(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
           fisher: list[torch.Tensor], epsilon: float) -> torch.Tensor:
    """Fisher merging (Matena & Raffel): θ = Σ w_i F_i ⊙ θ_i / Σ w_i F_i.

    ``epsilon`` is added to every F_i, so where all Fisher values vanish the result is the
    weighted average instead of 0/0.
    """
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for tensor, information, w in zip(tensors, fisher, weight):
        scaled = information.to(tensor.dtype).add(epsilon).mul_(w)  # w_i (F_i + ε)
        denominator.add_(scaled)
        numerator.addcmul_(scaled, tensor)
    return numerator.div_(denominator)
