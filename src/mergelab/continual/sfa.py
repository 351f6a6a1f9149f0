"""Sequential Fine-tuning Averaging for any PyTorch loop (Soup to go, Algorithm 1, Eq. 4–5).

While training on a new task for T optimizer steps, whenever ``t mod ⌈p·T⌉ = 0`` or ``t = T``:

    θ ← (1 − β)·θ + β·θ_o

where θ_o is the checkpoint after the previous task (the *anchor*) and β the weight on it.
Every floating-point entry of the state dict is averaged (parameters and float buffers);
integer buffers are left alone. Tied tensors (one storage under two names, e.g. a tied
``lm_head``) are averaged once.

This module also holds the small state-dict helpers the rest of ``mergelab.continual`` shares:
matching an anchor to a model, snapshots, restoring, and the L2 distance between checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch

from mergelab.errors import MergelabError

StateDict = Mapping[str, torch.Tensor]


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


# -- state-dict helpers -----------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers (their state-dict keys gain a prefix)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _groups(entries: Mapping[str, torch.Tensor], floats_only: bool) -> list[tuple[list[str], torch.Tensor]]:
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in entries.items():
        if floats_only and not tensor.dtype.is_floating_point:
            continue
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def tensor_groups(model: torch.nn.Module, floats_only: bool = True) -> list[tuple[list[str], torch.Tensor]]:
    """The model's state-dict entries as (names, live tensor), one entry per storage: tied
    tensors come once with all their names."""
    return _groups(unwrap(model).state_dict(keep_vars=True), floats_only)


def match_state(model: torch.nn.Module, state: StateDict, what: str = "the SFA anchor",
                floats_only: bool = True) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pair each (deduplicated) tensor of ``model`` with the tensor of the same name in ``state``.

    A tied tensor may appear in ``state`` under any one of its names. Raises MergelabError when
    ``state`` lacks a tensor, has one the model does not, or a shape differs.
    """
    entries = unwrap(model).state_dict(keep_vars=True)
    extra = sorted(name for name in state if name not in entries)
    if extra:
        hint = " (strip the 'module.' prefix of a DDP state dict)" if extra[0].startswith("module.") else ""
        raise MergelabError(f"{what} has tensor '{extra[0]}' that the model does not ({len(extra)} such tensors)"
                         f"{hint}; it must be a state dict of this same architecture")
    pairs, missing = [], []
    for names, tensor in _groups(entries, floats_only):
        found = next((n for n in names if n in state), None)
        if found is None:
            missing.append(names[0])
            continue
        other = state[found]
        if not isinstance(other, torch.Tensor):
            raise MergelabError(f"{what}: entry '{found}' is a {type(other).__name__}, not a tensor")
        if tuple(other.shape) != tuple(tensor.shape):
            raise MergelabError(f"{what}: tensor '{found}' has shape {tuple(other.shape)} but the model's has "
                             f"{tuple(tensor.shape)}; it must be a checkpoint of this same architecture")
        if tensor.dtype.is_floating_point and not other.dtype.is_floating_point:
            raise MergelabError(f"{what}: tensor '{found}' is {other.dtype} but the model's is {tensor.dtype}")
        pairs.append((found, tensor, other))
    if missing:
        raise MergelabError(f"{what} lacks tensor '{missing[0]}' of the model ({len(missing)} such tensors); it must "
                         f"be a state dict of this same architecture (e.g. model.state_dict() after the previous task)")
    return pairs


def load_state(source: StateDict | torch.nn.Module | str | Path) -> StateDict:
    """A state dict from a mapping, a module, a checkpoint directory or a safetensors/.bin file."""
    if isinstance(source, torch.nn.Module):
        return unwrap(source).state_dict()
    if isinstance(source, (str, Path)):
        from mergelab.io import CheckpointReader

        reader = CheckpointReader(source, label=str(source))
        try:
            return {name: reader.get(name) for name in reader.tensors}
        finally:
            reader.close()
    if isinstance(source, Mapping):
        return source
    raise MergelabError(f"an SFA anchor must be a state dict, a module, or a checkpoint path; got {type(source).__name__}")


def _storage_key(tensor: torch.Tensor):
    """Equal for two tensors that view the same memory the same way (``state_dict()`` detaches
    each name separately, so tied tensors arrive as distinct objects)."""
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype, str(tensor.device))
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return id(tensor)


def copy_state(state: StateDict, device: str | torch.device | None = None, floats_only: bool = True
               ) -> dict[str, torch.Tensor]:
    """Detached copies (on ``device``, default: where each tensor is), tensors that share a
    storage copied once and still shared."""
    copies: dict[int, torch.Tensor] = {}
    result = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or (floats_only and not tensor.dtype.is_floating_point):
            continue
        key = _storage_key(tensor)
        if key not in copies:
            copies[key] = tensor.detach().to(device=device or tensor.device, copy=True)
        result[name] = copies[key]
    return result


def snapshot(model: torch.nn.Module, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A copy of every state-dict tensor (integer buffers too), one name per tied storage."""
    return {names[0]: tensor.detach().to(device=device, copy=True)
            for names, tensor in tensor_groups(model, floats_only=False)}


@torch.no_grad()
def restore(model: torch.nn.Module, state: StateDict) -> None:
    """Copy ``state`` (a snapshot or any matching state dict) into the model's tensors in place."""
    for _, tensor, saved in match_state(model, state, what="the saved state", floats_only=False):
        tensor.copy_(saved)


@torch.no_grad()
def l2_distance(state_a: StateDict, state_b: StateDict) -> float:
    """‖θ_a − θ_b‖₂ over the floating-point tensors of ``state_a`` (each once), summed in float64."""
    total, seen = 0.0, set()
    for name, tensor in state_a.items():
        if not tensor.dtype.is_floating_point or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        other = state_b[name]
        total += float((tensor.double() - other.to(tensor.device).double()).square().sum())
    return math.sqrt(total)


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
    bfloat16 are averaged in float32 and cast back once.

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
        self.anchor = copy_state(load_state(anchor), anchor_device)
        self.averaged_at: list[int] = []
        if model is not None:
            match_state(model, self.anchor)

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
        for _, tensor, anchor in match_state(model, self.anchor):
            if tensor.dtype in (torch.float16, torch.bfloat16):
                mixed = tensor.float().mul_(keep).add_(anchor.to(tensor.device, torch.float32) * pull)
                tensor.copy_(mixed)
            else:
                tensor.mul_(keep).add_(anchor.to(tensor.device, tensor.dtype) * pull)

    def anchor_bytes(self) -> int:
        """Memory held by the anchor copy."""
        seen = {id(t): t for t in self.anchor.values()}
        return sum(t.numel() * t.element_size() for t in seen.values())
