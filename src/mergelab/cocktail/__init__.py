"""LM-Cocktail (Xiao et al. 2024): merge weights from a few examples, and the resilient-model
recipes built on the streaming merge engine.

Names load on first use, so ``from mergelab.cocktail.options import LossOptions`` (what the
CLI needs at start-up) imports neither torch nor transformers.
"""

import importlib

_HOMES = {
    "LossOptions": "options",
    "RECIPES": "recipes", "CocktailResult": "recipes", "cocktail": "recipes", "cocktail_config": "recipes",
    "alpha_sweep": "sweep",
    "fewshot_losses": "weights", "fewshot_weights": "weights", "load_examples": "weights",
    "softmax_weights": "weights",
}


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"mergelab.cocktail.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'mergelab.cocktail' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *_HOMES])


__all__ = ["LossOptions", "fewshot_weights", "fewshot_losses", "softmax_weights", "load_examples", "cocktail",
           "cocktail_config", "CocktailResult", "RECIPES", "alpha_sweep"]
