"""Adapters in training loops: what SFA averages on a ``PeftModel``.

On a PEFT model only the adapter's trainable weights (LoRA A/B, ``modules_to_save`` copies)
change, so SFA's anchor θ_o is those weights alone: the frozen base is neither copied nor
touched, and the anchor costs one copy of the adapter. The anchor may be the model itself
at the start, another ``PeftModel``, a state dict in the model's own names or in the names of
a saved adapter file, or a saved adapter directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from mergelab.errors import MergelabError


def _peft_model_class():
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def _unwrap(model):
    from mergelab.continual.state import unwrap

    return unwrap(model)


def is_peft_model(model) -> bool:
    peft_model = _peft_model_class()
    return peft_model is not None and isinstance(model, torch.nn.Module) and isinstance(_unwrap(model), peft_model)


def adapter_entries(model) -> dict[str, torch.Tensor] | None:
    """The live trainable tensors of a ``PeftModel`` by state-dict name (the adapter's
    weights); None for a model without adapters."""
    if not is_peft_model(model):
        return None
    entries = {name: param for name, param in _unwrap(model).named_parameters() if param.requires_grad}
    if not entries:
        raise MergelabError("the PEFT model has no trainable adapter weights; SFA has nothing to average "
                            "(is the adapter loaded with is_trainable=True?)")
    return entries


def _saved_names(model) -> dict[str, str]:
    """The model's trainable names -> their names in a saved adapter file."""
    from peft.utils import get_peft_model_state_dict

    from mergelab.continual.state import storage_key

    unwrapped = _unwrap(model)
    saved = {storage_key(t): key for key, t in get_peft_model_state_dict(
        unwrapped, adapter_name=unwrapped.active_adapter).items()}
    return {name: saved.get(storage_key(param), name) for name, param in adapter_entries(model).items()}


def adapter_anchor(anchor, model) -> dict[str, torch.Tensor] | None:
    """SFA's anchor on a ``PeftModel``: the adapter weights only, under the model's names.

    Args:
        anchor: a ``PeftModel`` (typically ``model`` itself at the start), a state dict (the
            model's names or a saved adapter file's), or a saved adapter directory.
        model: the model being trained (may be None when ``anchor`` is a ``PeftModel``).

    Returns:
        None when neither is a PEFT model (SFA then averages the whole state dict).
    """
    if isinstance(anchor, torch.nn.Module) and is_peft_model(anchor):
        if model is not None and not is_peft_model(model):
            raise MergelabError("the SFA anchor is a PEFT model but the model being trained is not; give a plain "
                                "state dict or checkpoint as the anchor")
        return {name: tensor.detach() for name, tensor in adapter_entries(anchor).items()}
    if model is None or not is_peft_model(model):
        return None
    if isinstance(anchor, torch.nn.Module):
        raise MergelabError("the model being trained is a PEFT model but the SFA anchor is a plain module; give the "
                            "adapter's state (a PeftModel, its saved adapter directory or its state dict)")
    if isinstance(anchor, (str, Path)):
        from mergelab.adapters.peft_dir import LoraAdapter, is_adapter_dir

        if not is_adapter_dir(anchor):
            raise MergelabError(f"the SFA anchor {anchor} is not a saved adapter directory (no adapter_config.json), "
                                f"but the model being trained is a PEFT model")
        with LoraAdapter(anchor) as adapter:
            anchor = {key: adapter.reader.get(key) for key in adapter.reader.tensors}
    if not isinstance(anchor, Mapping):
        raise MergelabError(f"an SFA anchor must be a state dict, a module, or a checkpoint path; got "
                            f"{type(anchor).__name__}")
    names = _saved_names(model)
    result = {}
    for name, saved in names.items():
        value = anchor.get(name, anchor.get(saved))
        if value is None:
            missing = sum(1 for n, s in names.items() if n not in anchor and s not in anchor)
            raise MergelabError(f"the SFA anchor lacks adapter tensor '{saved}' of the model ({missing} such "
                                f"tensors); it must be a state of this same adapter")
        result[name] = value
    return result
