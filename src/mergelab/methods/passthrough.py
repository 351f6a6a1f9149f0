"""Passthrough: one model, copied, each tensor optionally scaled (mergekit's ``passthrough``)."""

from __future__ import annotations

import torch


def passthrough(tensors: list[torch.Tensor], base: torch.Tensor | None, *, scale: list[float]) -> torch.Tensor:
    """θ = scale·θ_1: the one model's tensor, times its ``scale`` for this tensor (1 by default)."""
    (tensor,) = tensors
    return tensor if scale[0] == 1.0 else tensor.mul_(scale[0])
