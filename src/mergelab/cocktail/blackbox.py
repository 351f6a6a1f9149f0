"""Black-box merge weights: a gradient-free optimizer (nevergrad) minimizes the few-shot loss
of the merged model itself. This is the baseline the LM-Cocktail paper compares Eq. 2 with.

Weights are parametrized as w = softmax(z), so every candidate stays on the simplex (the
paper notes that unconstrained black-box weights drift away from summing to one). Each
evaluation needs the merged model, so all candidates are held in memory (float32 on CPU):
use it with models that fit N times in RAM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mergelab.cocktail.loss import LossOptions, load_candidate, model_loss
from mergelab.loading import model_params
from mergelab.errors import MergelabError
from mergelab.evaluate.runner import pooling_of
from mergelab.methods import METHODS
from mergelab.threads import Threads, use_threads


def _softmax(z) -> list[float]:
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), 0).tolist()


def merged_state(states: list[dict[str, torch.Tensor]], weights: Sequence[float], anchor=None,
                 alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Eq. 1 through the registry: ``lm_cocktail`` with the anchor (M_t) first, else ``linear``.

    Non-float tensors (buffers) are copied from the first candidate, as the engine does.
    Methods may work in place on their inputs (the engine hands them fresh tensors), so they
    get copies here.
    """
    merged = {}
    for name, tensor in states[0].items():
        if not tensor.dtype.is_floating_point:
            merged[name] = tensor
        elif anchor is not None:
            inputs = [anchor[name].clone(), *(s[name].clone() for s in states)]
            merged[name] = METHODS["lm_cocktail"].fn(inputs, None, weight=[1.0, *weights], alpha=alpha)
        else:
            inputs = [s[name].clone() for s in states]
            merged[name] = METHODS["linear"].fn(inputs, None, weight=list(weights), normalize=True)
    return merged


def blackbox_weights(candidates: Sequence[str | Path], examples: Sequence[dict], model_type: str = "decoder", *,
                     finetuned: str | Path | None = None, alpha: float = 0.5, budget: int = 40, seed: int = 0,
                     options: LossOptions = LossOptions(), batch_size: int = 8, device: str = "cpu",
                     tokenizer: str | Path | None = None, threads: Threads = "auto") -> tuple[list[float], float]:
    """Weights on the simplex minimizing the loss of α·M_t + (1−α)·Σ w_i M_i (or Σ w_i M_i).

    The loss is Eq. 2's, computed with the same ``options`` as the few-shot weights; ``threads``
    as in ``mergelab.threads``. Returns (weights, the best loss found).
    """
    try:
        import nevergrad as ng
        import numpy as np
    except ImportError:
        raise MergelabError("the black-box recipe needs nevergrad: pip install 'mergelab[blackbox]'") from None
    if budget < 1:
        raise MergelabError(f"budget must be at least 1 evaluation, got {budget}")
    with use_threads(threads, work_params=model_params(candidates[0])):
        model, loaded_tokenizer = load_candidate(candidates[0], model_type, device, tokenizer)
        states = [_state(path, model_type, tokenizer) for path in candidates]
        anchor = _state(finetuned, model_type, tokenizer) if finetuned is not None else None
        pooling = pooling_of(candidates[0])

        def loss_of(z) -> float:
            model.load_state_dict(merged_state(states, _softmax(z), anchor, alpha))
            return model_loss(model, loaded_tokenizer, examples, model_type, options, pooling=pooling,
                              batch_size=batch_size, device=device)

        parametrization = ng.p.Array(init=np.zeros(len(candidates)))
        parametrization.random_state = np.random.RandomState(seed)
        optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
        best = optimizer.minimize(loss_of)
        return _softmax(best.value), loss_of(best.value)


def _state(path, model_type: str, tokenizer=None) -> dict[str, torch.Tensor]:
    model, _ = load_candidate(path, model_type, "cpu", tokenizer)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
