"""The merge methods, one registry. Each entry points at the paper its formula comes from.

An entry is all the engine knows about a method: its parameters with their defaults and
ranges (the only place defaults are stated), whether it needs base_model (or takes the first
model as the base), how many models it merges, whether it draws random masks, which per-model
tensor files it reads, and its plan-time rule (``check``). A new method is one entry here.

Example:
    >>> import torch
    >>> from mergelab.methods import METHODS
    >>> base, a, b = torch.zeros(4), torch.tensor([1.0, -2, 3, 0]), torch.tensor([1.0, 2, 1, 0])
    >>> METHODS["ties"]([a, b], base, weight=[1.0, 1.0])  # density, lambda, normalize: registry defaults
    tensor([1., 2., 2., 0.])
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from mergelab.errors import MergelabError
from mergelab.methods.base import MergeMethod, Param
from mergelab.methods.arcee_fusion import arcee_fusion, arcee_fusion_notes
from mergelab.methods.karcher import check_karcher, karcher
from mergelab.methods.linear import check_fisher, check_lm_cocktail, fisher, linear, lm_cocktail, normalize_check
from mergelab.methods.model_stock import model_stock, model_stock_notes
from mergelab.methods.multislerp import check_multislerp, multislerp
from mergelab.methods.nearswap import nearswap
from mergelab.methods.nuslerp import nuslerp
from mergelab.methods.passthrough import passthrough
from mergelab.methods.ram import ram, ramplus_tl
from mergelab.methods.regmean import regmean, regmean_notes
from mergelab.methods.sce import sce
from mergelab.methods.slerp import slerp
from mergelab.methods.sparsify import Sparsify
from mergelab.methods.subspace import iso_c, iso_cts, subspace_notes, tsv
from mergelab.methods.task_arithmetic import Consensus, generalized_task_arithmetic

WEIGHT = Param("weight", None, per_model=True, required=True, help="model's weight w_i (required, as in mergekit)")
LAMBDA = Param("lambda", 1.0, help="scale λ of the combined task vector")
INT8_MASK = Param("int8_mask", False, kind=bool, ignored=True,
                  help="accepted for mergekit configs; masks are always int8")
KEEP_TIES = Param("keep_ties", True, kind=bool,
                  help="keep every entry tied at the top-k threshold (false: exactly int(density·numel), as mergekit)")
RANDOM_SPARSIFY = (Sparsify.RANDOM, Sparsify.DELLA)
MAGNITUDE_SPARSIFY = (Sparsify.MAGNITUDE, Sparsify.OUTLIERS)


def _density() -> Param:
    return Param("density", 1.0, per_model=True, low=0.0, high=1.0, low_open=True,
                 help="fraction of each task vector kept")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, kind=bool, help="divide by the sum of the weights that took part")


def _rescale(default: bool, sparsify: Sparsify | None) -> Param:
    if sparsify in RANDOM_SPARSIFY:
        what = "divide survivors by their keep probability (rescale_l1: restore the L1 norm instead)"
    else:
        what = "restore each thinned task vector's L1 norm (as mergekit)"
    return Param("rescale", default, kind=bool, help=what)


def _task_notes(sparsify: Sparsify | None):
    """Where a task-vector method deliberately differs from mergekit, for one tensor's parameters."""

    def notes(params: dict, numel: int) -> list[str]:
        thinned = sparsify is not None and min(params["density"]) < 1.0
        found = []
        if thinned and sparsify in MAGNITUDE_SPARSIFY and params["keep_ties"]:
            found.append("every entry tied at a top-k threshold is kept, where mergekit keeps exactly "
                         "int(density·numel) entries; set keep_ties: false for mergekit's count")
        if thinned and sparsify is Sparsify.OUTLIERS and any(int(g * numel) == 0 for g in params["gamma"]):
            found.append("where int(gamma·numel) is 0 (gamma 0, or a tensor of under 1/gamma entries) mergelab "
                         "keeps the density fraction as the paper does, where mergekit 0.1.x drops the whole task "
                         "vector (an empty slice) and returns the base tensor; no key reproduces that")
        if thinned and sparsify in RANDOM_SPARSIFY and params["rescale"] and not params["rescale_l1"]:
            what = "1/density" if sparsify is Sparsify.RANDOM else "1/its keep probability"
            found.append(f"survivors are rescaled by {what} as the paper does, where mergekit scales each "
                         f"thinned task vector back to its L1 norm before thinning; set rescale_l1: true for "
                         f"mergekit's rescale (the random masks differ from mergekit's in any case)")
        return found

    return notes


def _check_della(method: str):
    normalizable = normalize_check(method)

    def check(params: dict, where: str) -> str | None:
        for density, epsilon in zip(params["density"], params["epsilon"]):
            if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
                return (f"{method}: density {density:g} ± epsilon {epsilon:g} {where} leaves (0, 1); keep "
                        f"probabilities must lie inside it, so choose epsilon < min(density, 1 − density)")
        return normalizable(params, where)

    return check


def _task_method(name: str, paper: str, summary: str, *, sparsify: Sparsify | None, consensus: Consensus | None,
                 normalize: bool, rescale: bool) -> MergeMethod:
    """A registry entry for one configuration of ``generalized_task_arithmetic``, with mergekit's
    parameters and defaults (density 1, weight required; normalize and rescale per method)."""
    params = [WEIGHT, LAMBDA, _normalize(normalize), _rescale(rescale, sparsify), INT8_MASK]
    fixed = {"sparsify": sparsify, "consensus": consensus}
    if sparsify is None:
        fixed["density"] = None  # nothing is thinned; rescale is accepted (as mergekit) and changes nothing
    else:
        params.append(_density())
    if sparsify is Sparsify.OUTLIERS:
        params.append(Param("gamma", 0.01, per_model=True, low=0.0, high=1.0,
                            help="fraction of the largest |τ| dropped as outliers"))
    else:
        fixed["gamma"] = None
    if sparsify is Sparsify.DELLA:
        params.append(Param("epsilon", 0.15, per_model=True, low=0.0,
                            help="keep probabilities span density ± epsilon by |τ| rank within a row"))
    else:
        fixed["epsilon"] = None
    if sparsify in MAGNITUDE_SPARSIFY:
        params.append(KEEP_TIES)
    else:
        fixed["keep_ties"] = None
    if sparsify in RANDOM_SPARSIFY:
        params.append(Param("rescale_l1", False, kind=bool,
                            help="with rescale: restore the L1 norm (mergekit) instead of 1/keep probability"))
    else:
        fixed.update(rescale_l1=None, seed=None, key=None)  # no random mask to draw
    return MergeMethod(
        name, generalized_task_arithmetic, tuple(params), paper, uses_base=True,
        uses_seed=sparsify in RANDOM_SPARSIFY, summary=summary,
        check=_check_della(name) if sparsify is Sparsify.DELLA else normalize_check(name),
        notes=_task_notes(sparsify), extra=fixed,
    )


def _sce_notes(params: dict, numel: int) -> list[str]:
    if params["select_topk"] < 1.0 and params["keep_ties"]:
        return ["every position tied at the select_topk variance threshold is kept, where mergekit keeps exactly "
                "int(select_topk·count) positions; set keep_ties: false for mergekit's count"]
    return []


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(
        "linear", linear, (WEIGHT, _normalize(True)),
        "Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
        summary="weighted average Σ w_i θ_i", check=normalize_check("linear"),
    ),
    "task_arithmetic": _task_method(
        "task_arithmetic", "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
        "θ_b + λ Σ w_i τ_i", sparsify=None, consensus=None, normalize=False, rescale=False,
    ),
    "ties": _task_method(
        "ties", "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
        "trim top-k |τ|, elect sign, disjoint mean", sparsify=Sparsify.MAGNITUDE, consensus=Consensus.SIGN,
        normalize=True, rescale=False,
    ),
    "dare_linear": _task_method(
        "dare_linear", "Yu et al. 2024, Language models are Super Mario / DARE (arXiv:2311.03099)",
        "random drop + 1/density rescale, then task arithmetic", sparsify=Sparsify.RANDOM, consensus=None,
        normalize=False, rescale=True,
    ),
    "dare_ties": _task_method(
        "dare_ties", "Yu et al. 2024, DARE (arXiv:2311.03099) + TIES sign election",
        "random drop + 1/density rescale, then TIES elect and sum", sparsify=Sparsify.RANDOM,
        consensus=Consensus.SIGN, normalize=False, rescale=True,
    ),
    "breadcrumbs": _task_method(
        "breadcrumbs", "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)",
        "drop top gamma and bottom |τ| (keep density), then task arithmetic", sparsify=Sparsify.OUTLIERS,
        consensus=None, normalize=False, rescale=False,
    ),
    "breadcrumbs_ties": _task_method(
        "breadcrumbs_ties", "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795) + TIES sign election",
        "Breadcrumbs mask, then TIES elect and sum", sparsify=Sparsify.OUTLIERS, consensus=Consensus.SIGN,
        normalize=False, rescale=False,
    ),
    "della": _task_method(
        "della", "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
        "drop with |τ|-ranked keep probability per row, rescale, then TIES elect and disjoint mean",
        sparsify=Sparsify.DELLA, consensus=Consensus.SIGN, normalize=True, rescale=True,
    ),
    "della_linear": _task_method(
        "della_linear", "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
        "drop with |τ|-ranked keep probability per row, rescale, then task arithmetic",
        sparsify=Sparsify.DELLA, consensus=None, normalize=False, rescale=True,
    ),
    "sce": MergeMethod(
        "sce", sce,
        (Param("select_topk", 1.0, low=0.0, high=1.0, help="fraction of positions kept, by variance across τ_i"),
         KEEP_TIES, INT8_MASK),
        "Wan et al. 2024, FuseChat (arXiv:2408.07990): Select, Calculate, Erase", uses_base=True,
        summary="keep high-variance positions, weights from mean squares, erase minority signs",
        notes=_sce_notes,
    ),
    "ram": MergeMethod(
        "ram", ram,
        (Param("epsilon", 1e-5, low=0.0, help="|τ| at or below this counts as unchanged"),),
        "Reinforced Agent Merging (arXiv:2601.13572)", uses_base=True,
        summary="unique task-vector entries kept whole, shared ones averaged",
    ),
    "ramplus_tl": MergeMethod(
        "ramplus_tl", ramplus_tl,
        (Param("epsilon", 1e-5, low=0.0, help="|τ| at or below this counts as unchanged"),
         Param("r", 0.1, help="strength of the rescaling of unique entries"),
         Param("alpha", 0.2, low=0.0, help="upper bound of the shared/unique ratio ρ")),
        "Reinforced Agent Merging, RAM+ (arXiv:2601.13572), tensor-local as in mergekit", uses_base=True,
        summary="RAM with unique entries scaled by 1 + r·clip(shared/unique, 0, α) per tensor",
    ),
    "passthrough": MergeMethod(
        "passthrough", passthrough,
        (Param("scale", 1.0, per_model=True, help="factor applied to the tensor"),),
        "mergekit's passthrough (no paper: copies one model)", min_models=1, max_models=1,
        summary="copy one model, optionally scaling tensors",
    ),
    "slerp": MergeMethod(
        "slerp", slerp, (Param("t", None, low=0.0, high=1.0, required=True,
                                   help="0 = base_model, 1 = the other model (required, as in mergekit)"),),
        "Shoemake 1985; as popularised by mergekit", uses_base=True, first_model_is_base=True,
        min_models=1, max_models=1,
        summary="spherical interpolation between two models",
    ),
    "nuslerp": MergeMethod(
        "nuslerp", nuslerp,
        (WEIGHT,
         Param("nuslerp_flatten", True, kind=bool, help="interpolate the flattened tensors (false: slice by slice)"),
         Param("nuslerp_row_wise", False, kind=bool,
               help="with nuslerp_flatten false: slices along the first dimension instead of the last")),
        "Shoemake 1985 (SLERP); mergekit's NuSLERP: t from weights, optionally on task vectors",
        optional_base=True, min_models=2, max_models=2,
        summary="SLERP from the first model to the second at t = w_2/(w_1+w_2); task vectors if base_model",
    ),
    "multislerp": MergeMethod(
        "multislerp", multislerp,
        (WEIGHT, Param("normalize_weights", True, kind=bool, help="divide the weights by their sum"),
         Param("eps", 1e-8, low=0.0, help="added to each norm before dividing by it")),
        "Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea)", optional_base=True,
        summary="barycentre on the sphere: weighted mean direction × weighted mean norm",
        check=check_multislerp,
    ),
    "karcher": MergeMethod(
        "karcher", karcher,
        (Param("max_iter", 10, kind=int, low=0.0, help="most steps of the Riemannian mean iteration"),
         Param("tol", 1e-5, low=0.0, help="stop when the mean tangent step is shorter (radians)")),
        "Karcher 1977, Riemannian center of mass (the Fréchet mean on the sphere), as in mergekit",
        summary="Riemannian mean of the directions × mean norm", check=check_karcher,
    ),
    "nearswap": MergeMethod(
        "nearswap", nearswap,
        (Param("t", None, required=True, low=0.0,
               help="entries within t of the base are taken whole; farther ones move t toward the other model"),),
        "alchemonaut 2024, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)", uses_base=True,
        min_models=1, max_models=1, summary="θ_b + clamp(t/|θ_1 − θ_b|, 0, 1)·(θ_1 − θ_b)",
    ),
    "arcee_fusion": MergeMethod(
        "arcee_fusion", arcee_fusion, (),
        "Arcee AI 2025, Arcee Fusion (mergekit v0.1 release blog)", uses_base=True, min_models=1, max_models=1,
        summary="take θ_1 where |θ_1 − θ_b|·KL(softmax) is an outlier (≥ median + 1.5·IQR)",
        notes=arcee_fusion_notes,
    ),
    "model_stock": MergeMethod(
        "model_stock", model_stock,
        (Param("filter_wise", False, kind=bool, help="one ratio per output row instead of per tensor"),
         Param("cosine_floor", 0.0, low=-1.0, high=1.0,
               help="lower bound of the mean cosine (0 keeps t in [0, 1]; -1: none, as mergekit)")),
        "Jang et al. 2024, Model Stock (arXiv:2403.19522)", uses_base=True, min_models=2,
        summary="t·avg(θ_i) + (1−t)·θ_b, t from task-vector cosines", notes=model_stock_notes,
    ),
    "fisher": MergeMethod(
        "fisher", fisher,
        (Param("weight", 1.0, per_model=True, low=0.0, help="model's weight w_i"),
         Param("epsilon", 1e-8, low=0.0, low_open=True, help="added to every Fisher value"),
         Param("fisher", None, per_model=True, kind=str, tensor_file=True,
               help="path of the model's Fisher file (make one with `mergelab fisher`)")),
        "Matena & Raffel 2022, Merging models with Fisher-weighted averaging (arXiv:2111.09832)",
        summary="Σ F_i θ_i / Σ F_i", check=check_fisher, in_mergekit=False,
    ),
    "lm_cocktail": MergeMethod(
        "lm_cocktail", lm_cocktail,
        (Param("weight", 1.0, per_model=True, low=0.0, help="candidate's weight w_i (normalized)"),
         Param("alpha", 0.5, low=0.0, high=1.0, help="weight of the fine-tuned model (models[0])")),
        "Xiao et al. 2024, LM-Cocktail (arXiv:2311.13534), Eq. 1", min_models=2,
        summary="α·M_t + (1−α)·Σ w_i M_i, M_t = first model", check=check_lm_cocktail, in_mergekit=False,
    ),
    "regmean": MergeMethod(
        "regmean", regmean,
        (Param("alpha", 0.9, low=0.0, high=1.0,
               help="scale of the Grams' off-diagonal entries (the paper's 0.9; 1: plain RegMean)"),
         Param("gram", None, per_model=True, kind=str, tensor_file=True, tensor_file_shape="columns",
               help="path of the model's Gram file (make one with `mergelab regmean-stats`)")),
        "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean, ICLR 2023, "
        "arXiv:2212.09849)", min_models=1,
        summary="per linear weight: Wᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, G̃_i = the input Gram with off-diagonals × alpha; "
                "other tensors averaged",
        notes=regmean_notes, in_mergekit=False,
    ),
    "tsv": MergeMethod(
        "tsv", tsv,
        (Param("alpha", 1.0, low=0.0, help="scale of the merged task matrix (the paper's 1.0)"),
         Param("fraction", 0.0, low=0.0, high=1.0,
               help="share of each task matrix's rank kept, k = int(fraction·r); 0 (default): 1/N, as the paper")),
        "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging "
        "(CVPR 2025, arXiv:2412.00081)", uses_base=True,
        summary="per matrix: each τ_i's top-k singular triplets, U and V orthogonalized, Δ = U⊥ S V⊥ᵀ",
        notes=subspace_notes, in_mergekit=False,
    ),
    "iso_c": MergeMethod(
        "iso_c", iso_c,
        (Param("alpha", 1.0, low=0.0,
               help="scale of the merged task matrix (the paper tunes it on validation data; FusionBench's default 1.0)"),),
        "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging (ICML 2025, arXiv:2502.04959), Iso-C",
        uses_base=True, summary="per matrix: Σ τ_i = U S Vᵀ with every singular value set to mean(S)",
        notes=subspace_notes, in_mergekit=False,
    ),
    "iso_cts": MergeMethod(
        "iso_cts", iso_cts,
        (Param("alpha", 1.0, low=0.0,
               help="scale of the merged task matrix (the paper tunes it on validation data; FusionBench's default 1.0)"),
         Param("common_fraction", 0.8, low=0.0, high=1.0,
               help="share of the rank spanned by Σ τ_i's top directions (the paper's 0.8); the rest is split "
                    "evenly over the tasks")),
        "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging (ICML 2025, arXiv:2502.04959), Iso-CTS",
        uses_base=True,
        summary="Iso-C on Σ τ_i's top directions plus each τ_i's own top directions outside them",
        notes=subspace_notes, in_mergekit=False,
    ),
}

IGNORED_PARAMS = {p.name for method in METHODS.values() for p in method.params if p.ignored}


@dataclass(frozen=True)
class Preset:
    """A named setting of a method from its paper, for grids and baselines (never a silent default:
    the registry's defaults are mergekit's, so that a mergekit YAML means the same here).

    ``parameters(n)`` gives the top-level parameters for ``n`` merged models.
    """

    name: str
    method: str
    parameters: Callable[[int], dict[str, Any]]
    source: str

    def settings(self, n_models: int) -> dict[str, Any]:
        return dict(self.parameters(n_models))


PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("ties-paper", "ties", lambda n: {"density": 0.2, "lambda": 1.0},
           "Yadav et al. 2023 (TIES): keep the top 20% of each task vector, λ = 1"),
    Preset("dare_ties-paper", "dare_ties", lambda n: {"density": 0.1, "lambda": 1.0},
           "Yu et al. 2024 (DARE): drop rate p = 0.9, so 10% of each task vector survives, then TIES"),
    Preset("dare_linear-paper", "dare_linear", lambda n: {"density": 0.1, "lambda": 1.0},
           "Yu et al. 2024 (DARE): drop rate p = 0.9, then task arithmetic"),
    Preset("task_arithmetic-mean", "task_arithmetic", lambda n: {"lambda": 1.0 / n},
           "θ_b + the mean task vector (λ = 1/N), the equal-weight task arithmetic of the soup-to-go baselines"),
)}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        raise MergelabError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}"
                            + (f" (did you mean '{close[0]}'?)" if close else "")) from None


def get_method(name: str) -> MergeMethod:
    """Look a method up by name, with the list of valid names in the error."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergelabError(f"unknown merge_method '{name}'; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "Param", "Sparsify", "Consensus", "get_method", "IGNORED_PARAMS", "PRESETS",
           "Preset", "get_preset"]
