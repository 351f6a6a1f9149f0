"""State-dict helpers shared by SFA, the baselines, the stream runner and the Fisher estimator:
the one rule for tied tensors, matching a checkpoint to a model, snapshots, restoring, and the
L2 distance between checkpoints.

Tied tensors (one storage under two names, e.g. a tied ``lm_head``) are found in one way
only, ``storage_key``: two tensors are the same tensor when they view the same memory the
same way. That holds for live parameters (``state_dict(keep_vars=True)``) and for detached
state dicts alike, where each name arrives as a distinct tensor object.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import torch

from mergelab.errors import MergelabError

StateDict = Mapping[str, torch.Tensor]


def storage_key(tensor: torch.Tensor):
    """Equal for two tensors that view the same memory the same way."""
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype, str(tensor.device))
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return id(tensor)


def tied_groups(entries: Mapping[str, torch.Tensor], floats_only: bool = False) -> list[tuple[list[str], torch.Tensor]]:
    """``entries`` as (names, tensor), one item per storage: tied tensors come once with all
    their names, in the order of their first name."""
    groups: dict = {}
    for name, tensor in entries.items():
        if floats_only and not tensor.dtype.is_floating_point:
            continue
        groups.setdefault(storage_key(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each storage once."""
    return list({storage_key(t): t for t in tensors}.values())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers (their state-dict keys gain a prefix)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def tensor_groups(model: torch.nn.Module, floats_only: bool = True) -> list[tuple[list[str], torch.Tensor]]:
    """The model's state-dict entries as (names, live tensor), one entry per storage."""
    return tied_groups(unwrap(model).state_dict(keep_vars=True), floats_only)


def match_state(model: torch.nn.Module, state: StateDict, what: str = "the SFA anchor",
                floats_only: bool = True, entries: StateDict | None = None
                ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pair each (deduplicated) tensor of ``model`` with the tensor of the same name in ``state``.

    A tied tensor may appear in ``state`` under any one of its names. Raises MergelabError when
    ``state`` lacks a tensor, has one the model does not, or a shape differs. ``entries``: the
    model's live tensors to pair (default: its whole state dict; SFA on a PEFT model passes
    the adapter's).
    """
    entries = unwrap(model).state_dict(keep_vars=True) if entries is None else entries
    extra = sorted(name for name in state if name not in entries)
    if extra:
        hint = " (strip the 'module.' prefix of a DDP state dict)" if extra[0].startswith("module.") else ""
        raise MergelabError(f"{what} has tensor '{extra[0]}' that the model does not ({len(extra)} such tensors)"
                            f"{hint}; it must be a state dict of this same architecture")
    pairs, missing = [], []
    for names, tensor in tied_groups(entries, floats_only):
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
        raise MergelabError(f"{what} lacks tensor '{missing[0]}' of the model ({len(missing)} such tensors); it "
                            f"must be a state dict of this same architecture (e.g. model.state_dict() after the "
                            f"previous task)")
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
    raise MergelabError(f"an SFA anchor must be a state dict, a module, or a checkpoint path; got "
                        f"{type(source).__name__}")


def copy_state(state: StateDict, device: str | torch.device | None = None, floats_only: bool = True
               ) -> dict[str, torch.Tensor]:
    """Detached copies (on ``device``, default: where each tensor is), tensors that share a
    storage copied once and still shared."""
    result = {}
    tensors = {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}
    for names, tensor in tied_groups(tensors, floats_only):
        copied = tensor.detach().to(device=device or tensor.device, copy=True)
        result.update((name, copied) for name in names)
    return {name: result[name] for name in tensors if name in result}  # the state's own order


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
    """‖θ_a − θ_b‖₂ over the floating-point tensors of ``state_a`` (each storage once), summed in float64."""
    total = 0.0
    for names, tensor in tied_groups(state_a, floats_only=True):
        other = state_b[names[0]]
        total += float((tensor.double() - other.to(tensor.device).double()).square().sum())
    return math.sqrt(total)
