"""LM-Cocktail (Xiao et al. 2024): merge weights from a few examples, and the resilient-model
recipes built on the streaming merge engine."""

from mergelab.cocktail.loss import LossOptions
from mergelab.cocktail.recipes import RECIPES, CocktailResult, cocktail, cocktail_config
from mergelab.cocktail.sweep import alpha_sweep
from mergelab.cocktail.weights import fewshot_losses, fewshot_weights, load_examples, softmax_weights

__all__ = ["LossOptions", "fewshot_weights", "fewshot_losses", "softmax_weights", "load_examples", "cocktail",
           "cocktail_config", "CocktailResult", "RECIPES", "alpha_sweep"]
