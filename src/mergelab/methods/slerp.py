"""Spherical linear interpolation between two checkpoints (Shoemake 1985; mergekit's 'slerp')."""

from __future__ import annotations

import math

import torch

PARALLEL = 0.9995  # above this |cos| the arc is numerically a line: interpolate linearly
TINY = 1e-8  # a tensor whose norm is at or below this is not normalized (as in mergekit)


def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, t: float) -> torch.Tensor:
    """Interpolate from ``base`` (t = 0) to ``tensors[0]`` (t = 1) along the great circle.

    The angle is measured between the flattened tensors, each divided by its norm unless
    that norm is at most 1e-8 (so a zero tensor is orthogonal to anything, as in mergekit);
    when they are (anti)parallel, the result falls back to (1−t)·a + t·b.
    """
    start, end = base, tensors[0]
    start_norm, end_norm = float(start.norm()), float(end.norm())
    dot = float(start.reshape(-1) @ end.reshape(-1))
    cosine = dot / ((start_norm if start_norm > TINY else 1.0) * (end_norm if end_norm > TINY else 1.0))
    if abs(cosine) > PARALLEL:
        return torch.lerp(start, end, t)
    angle = math.acos(max(-1.0, min(1.0, cosine)))
    sin_angle = math.sin(angle)
    start_scale = math.sin((1.0 - t) * angle) / sin_angle
    end_scale = math.sin(t * angle) / sin_angle
    return end.mul_(end_scale).add_(start, alpha=start_scale)
