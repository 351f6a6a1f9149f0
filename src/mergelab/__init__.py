"""mergelab: merge checkpoints, choose merge weights, keep old skills, and measure it all."""

import importlib

from mergelab.errors import MergeError, MergelabError
from mergelab.threads import set_passive_wait_policy

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning (mergelab/threads.py says why); only effective
# before torch is imported, which is why it happens here, and why nothing here imports torch.
set_passive_wait_policy()

# Subpackages load on first attribute access (``mergelab.cocktail.fewshot_weights``), so that
# ``import mergelab`` and ``mergelab --help`` stay free of torch and transformers.
_SUBMODULES = ("adamerging", "adapters", "cocktail", "config", "continual", "data_aware", "engine", "evaluate",
               "experiments", "fisher", "grams", "io", "loading", "methods", "threads")
_FUNCTIONS = {"regmean_stats": "mergelab.grams"}  # mergelab.regmean_stats(model, data, out)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"mergelab.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'mergelab' has no attribute '{name}'")


def merge(config, out_dir, **options):
    """Merge checkpoints as a mergekit-style config describes and write an HF model dir.

    Args:
        config: a path to a YAML file, a YAML string, a dict, or a ``MergeConfig``.
        out_dir: the directory to create. It appears only when the merge succeeded.
        **options: ``force``, ``threads`` ("auto" or a count), ``max_memory``, ``executor`` ("local" or
            "ray"), ``address``, ``device``, ``seed``, ``shard_size``, ``quiet``, ``no_model_card`` (see
            ``mergelab.config.MergeOptions``; an unknown name is refused).

    Returns:
        The ``pathlib.Path`` of the merged model directory.

    Example:
        >>> import mergelab
        >>> mergelab.merge({"merge_method": "linear", "parameters": {"weight": 0.5},
        ...                 "models": [{"model": "a"}, {"model": "b"}]}, "out")  # doctest: +SKIP
    """
    from mergelab.engine import run_merge

    return run_merge(config, out_dir, **options)


__all__ = ["MergelabError", "MergeError", "merge", "__version__"]
