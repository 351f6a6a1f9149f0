"""The merge methods, one registry. Each entry points at the paper its formula comes from.

An entry is all the engine knows about a method: its parameters with their defaults and
ranges (the only place defaults are stated), whether it needs base_model (or takes the first
model as the base), how many models it merges, whether it draws random masks, which per-model
tensor files it reads, and its plan-time rule (``check``). A new method is one entry here.

Example:
    >>> import torch
    >>> from mergelab.methods import METHODS
    >>> base, a, b = torch.zeros(4), torch.tensor([1.0, -2, 3, 0]), torch.tensor([1.0, 2, 1, 0])
    >>> METHODS["ties"]([a, b], base, density=[1.0, 1.0])  # weight, lambda, normalize: registry defaults
    tensor([1., 2., 2., 0.])
"""

from __future__ import annotations

from mergelab.errors import MergelabError
from mergelab.methods.base import MergeMethod, Param
from mergelab.methods.linear import check_fisher, check_lm_cocktail, fisher, linear, lm_cocktail, normalize_check
from mergelab.methods.model_stock import model_stock
from mergelab.methods.slerp import slerp
from mergelab.methods.sparsify import Sparsify
from mergelab.methods.task_arithmetic import Consensus, generalized_task_arithmetic

WEIGHT = Param("weight", 1.0, per_model=True, help="model's weight w_i")
LAMBDA = Param("lambda", 1.0, help="scale λ of the combined task vector")
INT8_MASK = Param("int8_mask", False, kind=bool, ignored=True,
                  help="accepted for mergekit configs; masks are always int8")


def _density(default: float) -> Param:
    return Param("density", default, per_model=True, low=0.0, high=1.0, low_open=True,
                 help="fraction of each task vector kept")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, kind=bool, help="divide by the sum of the weights that took part")


def _task_method(name: str, paper: str, summary: str, *, sparsify: Sparsify | None, consensus: Consensus | None,
                 density: float | None, normalize: bool) -> MergeMethod:
    params = [WEIGHT, LAMBDA, _normalize(normalize), INT8_MASK]
    if sparsify is not None:
        params.append(_density(density))
    if sparsify is Sparsify.RANDOM:
        params.append(Param("rescale", True, kind=bool, help="rescale DARE survivors by 1/density"))
    fixed = {"sparsify": sparsify, "consensus": consensus}
    if sparsify is None:
        fixed["density"] = None  # nothing is thinned
    if sparsify is not Sparsify.RANDOM:
        fixed.update(rescale=None, seed=None, key=None)  # no random mask to draw
    return MergeMethod(
        name, generalized_task_arithmetic, tuple(params), paper, uses_base=True,
        uses_seed=sparsify is Sparsify.RANDOM, summary=summary, check=normalize_check(name),
        extra=fixed,
    )


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(
        "linear", linear, (WEIGHT, _normalize(True)),
        "Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
        summary="weighted average Σ w_i θ_i", check=normalize_check("linear"),
    ),
    "task_arithmetic": _task_method(
        "task_arithmetic", "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
        "θ_b + λ Σ w_i τ_i", sparsify=None, consensus=None, density=None, normalize=False,
    ),
    "ties": _task_method(
        "ties", "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
        "trim top-k |τ|, elect sign, disjoint mean", sparsify=Sparsify.MAGNITUDE, consensus=Consensus.SIGN,
        density=0.2, normalize=True,
    ),
    "dare_linear": _task_method(
        "dare_linear", "Yu et al. 2024, Language models are Super Mario / DARE (arXiv:2311.03099)",
        "random drop + 1/density rescale, then task arithmetic", sparsify=Sparsify.RANDOM, consensus=None,
        density=0.1, normalize=False,
    ),
    "dare_ties": _task_method(
        "dare_ties", "Yu et al. 2024, DARE (arXiv:2311.03099) + TIES sign election",
        "random drop + 1/density rescale, then TIES elect and disjoint mean", sparsify=Sparsify.RANDOM,
        consensus=Consensus.SIGN, density=0.1, normalize=True,
    ),
    "slerp": MergeMethod(
        "slerp", slerp, (Param("t", 0.5, low=0.0, high=1.0, help="0 = base_model, 1 = the other model"),),
        "Shoemake 1985; as popularised by mergekit", uses_base=True, first_model_is_base=True,
        min_models=1, max_models=1,
        summary="spherical interpolation between two models",
    ),
    "model_stock": MergeMethod(
        "model_stock", model_stock,
        (Param("filter_wise", False, kind=bool, help="one ratio per output row instead of per tensor"),),
        "Jang et al. 2024, Model Stock (arXiv:2403.19522)", uses_base=True, min_models=2,
        summary="t·avg(θ_i) + (1−t)·θ_b, t from task-vector cosines",
    ),
    "fisher": MergeMethod(
        "fisher", fisher,
        (Param("weight", 1.0, per_model=True, low=0.0, help="model's weight w_i"),
         Param("epsilon", 1e-8, low=0.0, low_open=True, help="added to every Fisher value"),
         Param("fisher", None, per_model=True, kind=str, tensor_file=True,
               help="path of the model's Fisher file (make one with `mergelab fisher`)")),
        "Matena & Raffel 2022, Merging models with Fisher-weighted averaging (arXiv:2111.09832)",
        summary="Σ F_i θ_i / Σ F_i", check=check_fisher,
    ),
    "lm_cocktail": MergeMethod(
        "lm_cocktail", lm_cocktail,
        (Param("weight", 1.0, per_model=True, low=0.0, help="candidate's weight w_i (normalized)"),
         Param("alpha", 0.5, low=0.0, high=1.0, help="weight of the fine-tuned model (models[0])")),
        "Xiao et al. 2024, LM-Cocktail (arXiv:2311.13534), Eq. 1", min_models=2,
        summary="α·M_t + (1−α)·Σ w_i M_i, M_t = first model", check=check_lm_cocktail,
    ),
}

IGNORED_PARAMS = {p.name for method in METHODS.values() for p in method.params if p.ignored}


def get_method(name: str) -> MergeMethod:
    """Look a method up by name, with the list of valid names in the error."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergelabError(f"unknown merge_method '{name}'; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "Param", "Sparsify", "Consensus", "get_method", "IGNORED_PARAMS"]
