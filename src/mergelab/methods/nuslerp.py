"""NuSLERP (mergekit's 'nuslerp'): SLERP whose t comes from two model weights, on the whole
tensor or one slice at a time, optionally on task vectors relative to a base model."""

from __future__ import annotations

import math

import torch

from mergelab.methods import sphere

COLINEAR = 1e-8  # |sin θ| below this: the two vectors span no plane, interpolate linearly
MIN_NORM = 1e-7  # norms are clamped here before dividing, so a zero slice gives cos θ = 0


def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
            nuslerp_flatten: bool, nuslerp_row_wise: bool) -> torch.Tensor:
    """SLERP from ``tensors[0]`` (t = 0) to ``tensors[1]`` (t = 1), t = w_2 / (w_1 + w_2).

    With ``base`` the two task vectors θ_i − θ_b are interpolated and θ_b is added back.
    ``nuslerp_flatten`` interpolates the flattened tensors as one vector (what ``slerp``
    does); otherwise each vector along the last dimension (each row of a matrix) is
    interpolated on its own, or each vector along the first dimension (each column) with
    ``nuslerp_row_wise``. Weights summing to (almost) zero give t = 0.5.

    Example:
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> nuslerp([a, b], None, weight=[1.0, 1.0], nuslerp_flatten=True, nuslerp_row_wise=False)
        tensor([0.7071, 0.7071])
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    start, end = tensors
    if base is not None:
        start, end = start.sub_(base), end.sub_(base)  # task vectors, in place
    if nuslerp_flatten or start.dim() == 0:
        merged = slerp_whole(t, start, end)
    elif nuslerp_row_wise:  # slices along dim 0 (columns): move that dim last, as a view
        merged = slerp_last_dim(t, start.transpose(0, -1), end.transpose(0, -1)).transpose(0, -1)
    else:
        merged = slerp_last_dim(t, start, end)
    return merged.add_(base) if base is not None else merged


def _scales(t: float, cosine: float) -> tuple[float, float]:
    angle = math.acos(max(-1.0, min(1.0, cosine)))
    sin_angle = math.sin(angle)
    if abs(sin_angle) < COLINEAR:
        return 1.0 - t, t
    return math.sin((1.0 - t) * angle) / sin_angle, math.sin(t * angle) / sin_angle


def slerp_whole(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """SLERP of the two flattened tensors, written into ``end``; ``start`` is kept."""
    norms = max(sphere.norm(start), MIN_NORM) * max(sphere.norm(end), MIN_NORM)
    start_scale, end_scale = _scales(t, sphere.dot(start, end) / norms)
    return end.mul_(end_scale).add_(start, alpha=start_scale)


def slerp_last_dim(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """SLERP of every vector along the last dimension, written into ``end``; ``start`` is kept.
    (Slices are at most tens of thousands of entries long: float32 sums are accurate there.)

    sin((1−t)θ)/sin θ · start + sin(tθ)/sin θ · end, θ the angle between the two vectors
    (norms clamped at 1e-7); (1−t)·start + t·end where |sin θ| < 1e-8.
    """
    dots = torch.einsum("...i,...i->...", start, end).unsqueeze(-1)  # (..., 1)
    norms = start.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM) * end.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    angle = torch.acos((dots / norms).clamp(-1.0, 1.0))  # (..., 1)
    sin_angle = torch.sin(angle)
    colinear = sin_angle.abs() < COLINEAR
    safe_sin = torch.where(colinear, torch.ones_like(sin_angle), sin_angle)
    start_scale = torch.where(colinear, torch.full_like(angle, 1.0 - t), torch.sin((1.0 - t) * angle) / safe_sin)
    end_scale = torch.where(colinear, torch.full_like(angle, t), torch.sin(t * angle) / safe_sin)
    return end.mul_(end_scale).addcmul_(start, start_scale)
