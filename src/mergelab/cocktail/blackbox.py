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

from mergelab.cocktail.loss import decoder_loss, encoder_loss, load_candidate
from mergelab.errors import MergelabError
from mergelab.evaluate.runner import pooling_of


def _softmax(z) -> list[float]:
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), 0).tolist()


def blackbox_weights(candidates: Sequence[str | Path], examples: Sequence[dict], model_type: str = "decoder", *,
                     finetuned: str | Path | None = None, alpha: float = 0.5, budget: int = 40, seed: int = 0,
                     batch_size: int = 8, device: str = "cpu", **opts) -> tuple[list[float], float]:
    """Weights on the simplex minimizing the loss of α·M_t + (1−α)·Σ w_i M_i (or Σ w_i M_i).

    Returns (weights, the best loss found).
    """
    try:
        import nevergrad as ng
        import numpy as np
    except ImportError:
        raise MergelabError("the black-box recipe needs nevergrad: pip install 'mergelab[blackbox]'") from None
    if budget < 1:
        raise MergelabError(f"budget must be at least 1 evaluation, got {budget}")
    model, tokenizer = load_candidate(candidates[0], model_type, device)
    states = [_state(path, model_type) for path in candidates]
    anchor = _state(finetuned, model_type) if finetuned is not None else None
    pooling = opts.get("pooling") or pooling_of(candidates[0])

    def loss_of(z) -> float:
        weights = _softmax(z)
        merged = {}
        for name, tensor in states[0].items():
            if not tensor.dtype.is_floating_point:
                merged[name] = tensor
                continue
            mixed = sum(w * s[name] for w, s in zip(weights, states))
            merged[name] = alpha * anchor[name] + (1 - alpha) * mixed if anchor is not None else mixed
        model.load_state_dict(merged)
        if model_type == "decoder":
            return decoder_loss(model, tokenizer, examples, batch_size=batch_size, device=device)
        return encoder_loss(model, tokenizer, examples, batch_size=batch_size, device=device, pooling=pooling,
                            neg_number=opts.get("neg_number", 7))

    parametrization = ng.p.Array(init=np.zeros(len(candidates)))
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    best = optimizer.minimize(loss_of)
    weights = _softmax(best.value)
    return weights, loss_of(best.value)


def _state(path, model_type: str) -> dict[str, torch.Tensor]:
    model, _ = load_candidate(path, model_type, "cpu")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
