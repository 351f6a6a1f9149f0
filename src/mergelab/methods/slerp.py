"""Spherical linear interpolation between two checkpoints (Shoemake 1985; mergekit's 'slerp')."""

from __future__ import annotations

import math

import torch

PARALLEL = 0.9995  # above this |cos| the arc is numerically a line: interpolate linearly


def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, t: float) -> torch.Tensor:
    """Interpolate from ``base`` (t = 0) to ``tensors[0]`` (t = 1) along the great circle.

    The angle is measured between the flattened tensors; when they are (anti)parallel or
    one is zero, the result falls back to (1−t)·a + t·b.
    """
    start, end = base, tensors[0]
    norms = start.norm() * end.norm()
    cosine = float((start.reshape(-1) @ end.reshape(-1)) / norms) if norms > 0 else 1.0
    if abs(cosine) > PARALLEL:
        return torch.lerp(start, end, t)
    angle = math.acos(max(-1.0, min(1.0, cosine)))
    sin_angle = math.sin(angle)
    start_scale = math.sin((1.0 - t) * angle) / sin_angle
    end_scale = math.sin(t * angle) / sin_angle
    return end.mul_(end_scale).add_(start, alpha=start_scale)
