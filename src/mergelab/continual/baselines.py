"""The continual-learning baselines SFA is compared with, as small pieces for any loop.

* sequential fine-tuning: no piece at all, just train on the new task;
* ``L2Penalty``: λ/2·‖θ − θ_o‖², added to the loss at every step;
* ``EWCPenalty``: λ/2·Σ_j F_j (θ_j − θ_o,j)², F the diagonal empirical Fisher of the old
  task (``empirical_fisher``), Kirkpatrick et al. 2017;
* ``Rehearsal``: each new-task batch carries a fraction (default 10%) of old-task examples;
* ``union``: the training set of multitask training (every task seen so far).

Post-hoc merging of per-task models (Task Arithmetic, TIES) lives in ``posthoc.py``. Unlike
SFA, both penalties keep θ_o (and EWC also F) on the model's device and touch every
parameter at every step: that is the cost the paper's Section 4 contrasts SFA with.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mergelab.continual.state import StateDict, load_state, match_state, storage_key, tensor_groups
from mergelab.errors import MergelabError

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def check_strength(lam, name: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or math.isinf(lam):
        raise MergelabError(f"{name} strength lambda must be a finite number ≥ 0, got {lam!r}")
    return float(lam)


def check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise MergelabError(f"rehearsal fraction must be in (0, 1) (share of each batch from old tasks), "
                            f"got {fraction!r}")
    return float(fraction)


def _trainable_pairs(model: torch.nn.Module, anchor: StateDict, what: str
                     ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, parameter, anchor copy on the parameter's device) for each trainable parameter."""
    return [(name, tensor, anchor_tensor.detach().to(tensor.device, tensor.dtype, copy=True))
            for name, tensor, anchor_tensor in match_state(model, anchor, what=what) if _trainable(tensor)]


def _trainable(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad


class L2Penalty:
    """λ/2·‖θ − θ_o‖² over the trainable parameters.

    Example:
        >>> penalty = L2Penalty(model, previous_state, lam=0.1)  # doctest: +SKIP
        >>> loss = task_loss + penalty()  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, anchor: StateDict | torch.nn.Module | str | Path, lam: float):
        self.lam = check_strength(lam, "L2 penalty")
        self.pairs = _trainable_pairs(model, load_state(anchor), "the L2 anchor")

    def __call__(self) -> torch.Tensor:
        total = sum((tensor - anchor).square().sum() for _, tensor, anchor in self.pairs)
        return 0.5 * self.lam * total


class EWCPenalty:
    """λ/2·Σ F ⊙ (θ − θ_o)² with a diagonal Fisher F (Elastic Weight Consolidation).

    Args:
        model: the model being trained (its parameters are tracked).
        anchor: θ_o, the model after the old task(s).
        fisher: F keyed by parameter name (``empirical_fisher``); names may be any one of a
            tied tensor's names.
        lam: λ.
    """

    def __init__(self, model: torch.nn.Module, anchor: StateDict | torch.nn.Module | str | Path,
                 fisher: StateDict, lam: float):
        self.lam = check_strength(lam, "EWC")
        names_of = {storage_key(tensor): names for names, tensor in tensor_groups(model)}
        self.terms = []
        for name, tensor, anchor_tensor in _trainable_pairs(model, load_state(anchor), "the EWC anchor"):
            fisher_name = next((n for n in names_of[storage_key(tensor)] if n in fisher), None)
            if fisher_name is None:
                raise MergelabError(f"the Fisher lacks parameter '{name}'; estimate it on this model "
                                    f"(empirical_fisher)")
            weight = fisher[fisher_name]
            if tuple(weight.shape) != tuple(tensor.shape):
                raise MergelabError(f"the Fisher's tensor '{fisher_name}' has shape {tuple(weight.shape)}, the model's "
                                    f"{tuple(tensor.shape)}; estimate it on this model")
            self.terms.append((tensor, anchor_tensor, weight.detach().to(tensor.device, tensor.dtype)))

    def __call__(self) -> torch.Tensor:
        total = sum((weight * (tensor - anchor).square()).sum() for tensor, anchor, weight in self.terms)
        return 0.5 * self.lam * total


def empirical_fisher(model: torch.nn.Module, examples: Sequence[Any], loss_fn: LossFn,
                     collate: Callable[[list], Any], samples: int | None = 200, seed: int = 0
                     ) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of the old task for EWC: ``mergelab.fisher.fisher_diagonal``
    (the one estimator, also behind ``mergelab fisher``) on a seeded sample of its examples.

    Args:
        model: the model after the old task.
        examples: the old task's training examples; ``samples`` of them (seeded) are used.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (the task loss, e.g. mean cross-entropy).
        collate: turns a list of examples into a batch.

    Returns:
        float32 tensors keyed by state-dict name (see ``fisher_diagonal``).
    """
    from mergelab.fisher import fisher_diagonal  # mergelab.fisher imports this package's state helpers

    if not examples:
        raise MergelabError("EWC needs examples of the old task to estimate the Fisher; the task has none")
    chosen = list(examples)
    if samples is not None and samples < len(chosen):
        chosen = random.Random(seed).sample(chosen, samples)
    return fisher_diagonal(model, (collate([example]) for example in chosen), loss_fn)


class Rehearsal:
    """A buffer of old-task examples mixed into every new-task batch.

    Each batch of size B takes ``fraction``·B examples from the buffer (rounded at random so
    that the expected share is exact) and the rest from the new task.

    Args:
        old_examples: training examples of the earlier tasks.
        fraction: share of each batch drawn from the buffer, in (0, 1) (default 0.1).
        buffer_size: keep only this many old examples (a seeded random subset); default all.
    """

    def __init__(self, old_examples: Sequence[Any], fraction: float = 0.1, buffer_size: int | None = None,
                 seed: int = 0):
        self.fraction = check_fraction(fraction)
        if not old_examples:
            raise MergelabError("rehearsal needs old-task examples; the buffer is empty")
        self.buffer = list(old_examples)
        if buffer_size is not None and buffer_size < len(self.buffer):
            self.buffer = random.Random(seed).sample(self.buffer, buffer_size)

    def draw(self, new_examples: Sequence[Any], batch_size: int, rng: random.Random) -> list:
        """One mixed batch (old examples first, then new ones)."""
        exact = self.fraction * batch_size
        old_count = int(exact) + (rng.random() < exact - int(exact))
        old_count = min(old_count, batch_size - 1, len(self.buffer))
        new_count = min(batch_size - old_count, len(new_examples))
        return rng.sample(self.buffer, old_count) + rng.sample(new_examples, new_count)


def union(task_examples: Sequence[Sequence[Any]]) -> list:
    """The training set of multitask training: every example of every task given."""
    return [example for examples in task_examples for example in examples]
