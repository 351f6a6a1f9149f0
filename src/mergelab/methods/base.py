"""What a merge method is: a pure function plus a description of its parameters and rules.

A method is called as ``fn(tensors, base, **params) -> Tensor`` where ``tensors`` are the N
expert tensors in float32 (or float64), ``base`` is the base tensor or None, per-model
parameters arrive as lists (one entry per expert) and global ones as scalars. Methods may
overwrite the tensors in ``tensors`` and drop them from the list once used (the engine hands
over private copies, which keeps peak memory near N+1 tensors); they never touch ``base``
and keep no reference after returning.

The registry entry is the one source of a parameter's default: the pure functions take every
parameter without a default, and calling a registered ``MergeMethod`` fills in the ones left
out from its ``Param``s. A ``required`` parameter (``weight`` wherever mergekit requires it)
has no default: a config must give it.
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
    # Accepted in configs for mergekit compatibility but never passed to the function.
    ignored: bool = False
    # A per-model path to a tensor file with one tensor per model tensor (a Fisher, say): the
    # engine opens it beside the model and passes, under this name, one tensor per model.
    tensor_file: bool = False
    # What a tensor file holds: "same" (a Fisher: every floating-point tensor of the model, with
    # its shape) or "columns" (only some 2-D tensors [out, in] have an entry, of shape [in, in],
    # e.g. RegMean's input Grams; the method gets None for a tensor the file does not have).
    tensor_file_shape: str = "same"
    # No default: every model must be given a value (mergekit's required parameters).
    required: bool = False

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
    """A registered method: the function and the rules the engine checks before merging.

    The engine reads only these fields, never the method's name, so a new method is one entry.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    paper: str
    uses_base: bool = False  # True: base_model is required and enters the formula
    # True: without base_model, the first listed model is the base (slerp's first endpoint).
    first_model_is_base: bool = False
    # True (uses_base False): base_model may be given; then it is the base (task vectors are merged
    # relative to it, it is never one of the merged models), and without it the models are merged.
    optional_base: bool = False
    min_models: int = 1  # counted without the base model
    max_models: int | None = None  # == min_models: exactly that many
    uses_seed: bool = False  # receives seed= and key= (the tensor name) for reproducible randomness
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments (e.g. sparsify=)
    # (params of one tensor, "for tensor 'x'") -> a problem to report before merging, or None
    check: Callable[[dict[str, Any], str], str | None] | None = None
    # (params of one tensor, its number of entries) -> where this merge deliberately differs from
    # mergekit's, each with the key that selects mergekit's behaviour; warned once per plan
    notes: Callable[[dict[str, Any], int], list[str]] | None = None
    # False: mergekit has no such method, so plan notes are not phrased as differences from it
    in_mergekit: bool = True

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def tensor_params(self) -> tuple[Param, ...]:
        """The parameters whose values are numbers or flags, resolved per tensor."""
        return tuple(p for p in self.params if not (p.ignored or p.tensor_file))

    @property
    def tensor_files(self) -> tuple[Param, ...]:
        """The per-model parameters naming tensor files the engine opens as readers."""
        return tuple(p for p in self.params if p.tensor_file)

    def defaults(self, n_models: int) -> dict[str, Any]:
        """The registry's default of every per-tensor parameter that has one, for ``n_models`` models."""
        return {p.name: [p.default] * n_models if p.per_model else p.default
                for p in self.tensor_params if not p.required}

    def __call__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, **params: Any) -> torch.Tensor:
        """Run the formula; parameters left out take the registry's defaults (required ones must be given)."""
        missing = [p.name for p in self.tensor_params if p.required and p.name not in params]
        if missing:
            raise TypeError(f"{self.name} needs {', '.join(missing)} (required, as in mergekit)")
        return self.fn(tensors if isinstance(tensors, list) else list(tensors), base, **self.extra,
                       **{**self.defaults(len(tensors)), **params})


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i t_i, accumulated in place into the first tensor (which it overwrites)."""
    total = tensors[0].mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total
