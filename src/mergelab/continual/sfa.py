"""Sequential Fine-tuning Averaging for any PyTorch loop (Soup to go, Algorithm 1, Eq. 4–5).

While training on a new task for T optimizer steps, whenever ``t mod ⌈p·T⌉ = 0`` or ``t = T``:

    θ ← (1 − β)·θ + β·θ_o

where θ_o is the checkpoint after the previous task (the *anchor*) and β the weight on it.
Every floating-point entry of the state dict is averaged (parameters and float buffers);
integer buffers are left alone. Tied tensors (one storage under two names, e.g. a tied
``lm_head``) are averaged once.

The parameter checks here (``check_p``, ``check_beta``) are shared by SFA, the callback and the
continual-method registry; the state-dict helpers live in ``state.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergelab.adapters.training import adapter_anchor, adapter_entries
from mergelab.continual.state import StateDict, copy_state, load_state, match_state, unique_tensors
from mergelab.errors import MergelabError


# -- parameter checks (shared by SFA, the callback and the stream runner) ----------------------
def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergelabError(f"SFA {name} must be a number, got {value!r}")
    return float(value)


def check_p(p) -> float:
    p = _number(p, "p")
    if not 0.0 < p <= 1.0:  # also refuses NaN
        raise MergelabError(f"SFA p must be in (0, 1] (the fraction of the T steps between averagings; p=1 "
                         f"averages once, at the end), got {p}")
    return p


def check_beta(beta) -> float:
    beta = _number(beta, "beta")
    if not 0.0 <= beta <= 1.0:
        raise MergelabError(f"SFA beta must be in [0, 1] (the weight on the previous task's checkpoint θ_o; "
                         f"default 0.5), got {beta}")
    return beta


def check_total_steps(total_steps) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise MergelabError(f"SFA total_steps must be an integer of at least 1 (the optimizer steps planned on the "
                         f"new task), got {total_steps!r}")
    return total_steps


def averaging_interval(p: float, total_steps: int) -> int:
    """⌈p·T⌉, rounded to 9 decimals first so that e.g. p=0.7, T=10 gives 7, not 8."""
    return max(1, math.ceil(round(check_p(p) * check_total_steps(total_steps), 9)))


# -- SFA ----------------------------------------------------------------------------------------
class SFA:
    """Sequential Fine-tuning Averaging for a plain PyTorch loop.

    Args:
        anchor: θ_o, the previous task's final model: a state dict (``model.state_dict()`` is
            fine: SFA keeps its own copy), a module, or a checkpoint directory / file.
        total_steps: T, the number of optimizer steps planned on the new task.
        p: fraction of T between averagings, in (0, 1]; p=1 averages once, at step T.
        beta: weight on the anchor, in [0, 1].
        model: optional; when given, the anchor is checked against it right away (otherwise
            at the first averaging).
        anchor_device: where the anchor copy lives (e.g. ``"cpu"`` to save device memory);
            default: where the anchor tensors are.

    The only extra memory is one copy of the floating-point state. Parameters in float16 or
    bfloat16 are averaged in float32 and cast back once. On a PEFT ``PeftModel`` only the
    adapter's trainable weights are averaged (and copied): the frozen base is left alone, and
    the anchor may also be a saved adapter directory (``mergelab.adapters.training``).

    Example:
        >>> sfa = SFA(previous_model.state_dict(), total_steps=1000, p=0.25, beta=0.5)  # doctest: +SKIP
        >>> for step in range(1, 1001):  # doctest: +SKIP
        ...     loss = model(**next(batches)).loss; loss.backward(); opt.step(); opt.zero_grad()
        ...     sfa.maybe_average(model, step)
    """

    def __init__(self, anchor: StateDict | torch.nn.Module | str | Path, total_steps: int, p: float = 0.25,
                 beta: float = 0.5, *, model: torch.nn.Module | None = None,
                 anchor_device: str | torch.device | None = None):
        self.p, self.beta = check_p(p), check_beta(beta)
        self.total_steps = check_total_steps(total_steps)
        self.interval = averaging_interval(self.p, self.total_steps)
        adapter = adapter_anchor(anchor, model)  # a PEFT model: its adapter weights only
        self.anchor = copy_state(load_state(anchor) if adapter is None else adapter, anchor_device)
        self.averaged_at: list[int] = []
        if model is not None:
            self._pairs(model)

    def should_average(self, step: int) -> bool:
        """Whether the rule fires after optimizer step ``step`` (counted from 1)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise MergelabError(f"SFA step must be an integer of at least 1 (optimizer steps taken so far, counted "
                             f"from 1), got {step!r}")
        return step % self.interval == 0 or step == self.total_steps

    def maybe_average(self, model: torch.nn.Module, step: int) -> bool:
        """Call after each optimizer step; averages with the anchor when the rule fires.

        Returns:
            True when it averaged.
        """
        if not self.should_average(step):
            return False
        self.average(model)
        self.averaged_at.append(step)
        return True

    @torch.no_grad()
    def average(self, model: torch.nn.Module) -> None:
        """θ ← (1 − β)·θ + β·θ_o now, for every floating-point tensor of ``model``."""
        keep, pull = 1.0 - self.beta, self.beta
        for _, tensor, anchor in self._pairs(model):
            if tensor.dtype in (torch.float16, torch.bfloat16):
                mixed = tensor.float().mul_(keep).add_(anchor.to(tensor.device, torch.float32) * pull)
                tensor.copy_(mixed)
            else:
                tensor.mul_(keep).add_(anchor.to(tensor.device, tensor.dtype) * pull)

    def _pairs(self, model: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, live tensor, anchor tensor) to average: the whole state, or a PEFT model's adapter."""
        return match_state(model, self.anchor, entries=adapter_entries(model))

    def anchor_bytes(self) -> int:
        """Memory held by the anchor copy."""
        return sum(t.numel() * t.element_size() for t in unique_tensors(self.anchor.values()))
