"""SFA as a ``transformers.TrainerCallback``.

The same rule as ``SFA.maybe_average``, applied in ``on_step_end`` with ``state.global_step``
(optimizer steps, so gradient accumulation counts one step per update) and T =
``state.max_steps``.

Distributed training:

* **DDP** (``torchrun``/``accelerate launch`` without sharding): supported. Every rank holds
  a full replica, takes θ_o from its own (identical) model at ``on_train_begin`` and applies
  the same elementwise average at the same steps, so the replicas stay identical with no
  communication. Tested with two CPU processes (gloo).
* **FSDP** and **DeepSpeed**: refused with a MergelabError. Under FSDP a rank only holds shards
  and ``state_dict()`` gathers copies, so averaging those copies would change nothing; under
  DeepSpeed (and any optimizer that keeps fp32 master weights) the optimizer would overwrite
  the averaged weights at the next step. Averaging the sharded / master parameters directly
  is possible but untested here, so it is not offered.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from mergelab.continual.sfa import SFA, check_beta, check_p
from mergelab.continual.state import StateDict, load_state
from mergelab.errors import MergelabError


class SFACallback(TrainerCallback):
    """Sequential Fine-tuning Averaging inside ``transformers.Trainer``.

    Args:
        p: fraction of the trainer's max steps between averagings, in (0, 1].
        beta: weight on θ_o, in [0, 1].
        anchor: θ_o. Default: the model as it is when training begins (i.e. the previous
            task's model you pass to the Trainer). Or a state dict, module, or checkpoint dir.
        anchor_device: where the anchor copy lives (``"cpu"`` saves device memory).

    Example:
        >>> trainer = Trainer(model=model_after_task_a, args=args, train_dataset=task_b,  # doctest: +SKIP
        ...                   callbacks=[SFACallback(p=0.25, beta=0.5)])
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, p: float = 0.25, beta: float = 0.5,
                 anchor: StateDict | torch.nn.Module | str | Path | None = None,
                 anchor_device: str | torch.device | None = None):
        self.p, self.beta = check_p(p), check_beta(beta)
        self.anchor_device = anchor_device
        self._anchor = None if anchor is None else load_state(anchor)  # copied once, at train begin
        self.sfa: SFA | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _refuse_sharded(args)
        if model is None:
            raise MergelabError("SFACallback got no model from the Trainer")
        if self._anchor is None and state.global_step > 0:
            raise MergelabError(
                f"SFACallback: training resumes at step {state.global_step}, so the model at train begin is not the "
                f"previous task's checkpoint; pass it explicitly: SFACallback(anchor='path/to/previous-task-model')"
            )
        anchor = self._anchor if self._anchor is not None else model
        self.sfa = SFA(anchor, state.max_steps, self.p, self.beta, model=model, anchor_device=self.anchor_device)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.sfa is None:
            raise MergelabError("SFACallback.on_step_end ran before on_train_begin; add the callback to the Trainer")
        self.sfa.maybe_average(model, state.global_step)

    @property
    def averaged_at(self) -> list[int]:
        """The global steps at which the weights were averaged (for logs and tests)."""
        return [] if self.sfa is None else list(self.sfa.averaged_at)


def _refuse_sharded(args) -> None:
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise MergelabError("SFACallback does not support DeepSpeed: the optimizer's fp32 master weights (and ZeRO-3 "
                         "partitions) would undo the averaging. Use DDP, or average the master weights yourself")
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise MergelabError("SFACallback does not support FSDP: each rank holds only shards, so averaging the "
                         "state dict would change nothing. Use DDP (a full replica per rank)")
