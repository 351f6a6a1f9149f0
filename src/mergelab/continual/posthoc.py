"""Post-hoc merging baselines: per-task models trained separately from the base, merged
afterwards by the merge core (``mergelab.merge``), never by a copy of its formulas.

Any ``torch.nn.Module`` works: checkpoints are written as a directory holding one
``model.safetensors`` (tied tensors stored once), which the merge core reads like any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file

from mergelab.continual.state import load_state, restore, snapshot
from mergelab.errors import MergelabError
from mergelab.methods import PRESETS

# The papers' settings of the post-hoc baselines (given N per-task models); any other merge method
# of the registry that merges task vectors onto a base model runs with the registry's defaults.
PAPER_SETTINGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "task_arithmetic": PRESETS["task_arithmetic-mean"].settings,  # θ_b + the mean task vector
    "ties": PRESETS["ties-paper"].settings,  # TIES paper's density 0.2 (the registry's is mergekit's 1)
}
POSTHOC_METHODS = tuple(PAPER_SETTINGS)


def save_checkpoint(model_or_state: torch.nn.Module | dict[str, torch.Tensor], directory: str | Path) -> Path:
    """Write ``directory/model.safetensors`` (one tensor per tied storage); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = snapshot(model_or_state) if isinstance(model_or_state, torch.nn.Module) else model_or_state
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    return directory


def load_checkpoint(model: torch.nn.Module, directory: str | Path) -> None:
    """Copy the tensors of a checkpoint directory (single or sharded safetensors) into ``model``."""
    restore(model, load_state(Path(directory)))


def posthoc_config(method: str, base_dir: Path, expert_dirs: Sequence[Path], parameters: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The mergekit-style config of a post-hoc baseline.

    Defaults: every model weighs 1; Task Arithmetic with λ = 1/N (θ_b + mean of the task vectors,
    the paper's equal weights, e.g. "0.5 law, 0.5 math"); TIES at the paper's density 0.2 (the
    registry's default is mergekit's 1, no trimming). ``parameters`` overrides them (any
    parameter of that method, e.g. ``{"lambda": 0.8}`` or ``{"density": 0.5}``).
    """
    from mergelab.methods import METHODS

    registered = METHODS.get(method)
    if registered is None or not registered.uses_base:
        usable = sorted(name for name, entry in METHODS.items() if entry.uses_base)
        raise MergelabError(f"post-hoc baseline '{method}' is not a merge method that adds task vectors to a base "
                            f"model; choose one of: {', '.join(usable)}")
    if not expert_dirs:
        raise MergelabError(f"{method} needs at least one per-task model")
    paper = PAPER_SETTINGS.get(method, lambda count: {})(len(expert_dirs))
    weight = {"weight": 1.0} if registered.param("weight") is not None else {}
    merged_params: dict[str, Any] = {**weight, **paper, **(parameters or {})}
    return {"merge_method": method, "base_model": str(base_dir),
            "models": [{"model": str(path)} for path in expert_dirs], "parameters": merged_params}


def merge_task_models(method: str, base_dir: Path, expert_dirs: Sequence[Path], out_dir: Path,
                      parameters: dict[str, Any] | None = None) -> Path:
    """Merge per-task checkpoints (each fine-tuned from ``base_dir``) with the merge core."""
    from mergelab import merge

    return merge(posthoc_config(method, base_dir, expert_dirs, parameters), out_dir, force=True, quiet=True)
