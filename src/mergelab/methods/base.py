"""What a merge method is: a pure function plus a description of its parameters and rules.

A method is called as ``fn(tensors, base, **params) -> Tensor`` where ``tensors`` are the N
expert tensors in float32 (or float64), ``base`` is the base tensor or None, per-model
parameters arrive as lists (one entry per expert) and global ones as scalars. Methods may
overwrite the tensors in ``tensors`` and drop them from the list once used (the engine hands
over private copies, which keeps peak memory near N+1 tensors); they never touch ``base``
and keep no reference after returning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from mergelab.errors import MergelabError


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as it may appear in a mergekit-style YAML."""

    name: str
    default: Any
    per_model: bool = False  # may be set under models[].parameters (a list reaches the method)
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the range excludes ``low``
    help: str = ""

    def check(self, value: Any, where: str) -> Any:
        """Coerce and range-check a value; ``where`` names the tensor/model for the message."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergelabError(f"parameter '{self.name}' {where} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise MergelabError(f"parameter '{self.name}' {where} must be a string, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergelabError(f"parameter '{self.name}' {where} must be a number, got {value!r}")
        value = float(value)
        if value != value:
            raise MergelabError(f"parameter '{self.name}' {where} is NaN")
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            left = "(" if self.low_open else "["
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            raise MergelabError(
                f"parameter '{self.name}' {where} is {value:g}, outside {left}{low}, {high}]; "
                f"set it inside that range"
            )
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: the function and the rules the engine checks before merging."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    paper: str
    uses_base: bool = False  # True: base_model is required and enters the formula
    min_models: int = 1  # counted without the base model
    max_models: int | None = None
    uses_seed: bool = False  # receives seed= and key= (the tensor name) for reproducible randomness
    uses_fisher: bool = False  # receives fisher= (one tensor per model) read from models[].parameters.fisher
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments (e.g. sparsify=)
    # (params of one tensor, "for tensor 'x'") -> a problem to report before merging, or None
    check: Callable[[dict[str, Any], str], str | None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def __call__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, **params: Any) -> torch.Tensor:
        return self.fn(tensors if isinstance(tensors, list) else list(tensors), base, **self.extra, **params)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i t_i, accumulated in place into the first tensor (which it overwrites)."""
    total = tensors[0].mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total
