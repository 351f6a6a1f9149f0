"""Merge LoRA adapters of one base into one PEFT adapter, as PEFT's ``add_weighted_adapter`` does.

Combination types (PEFT's names and semantics):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (equal ranks): the A
  factors and the B factors are combined separately, A_i weighted by sign(w_i)·√|w_i·s_i| and
  B_i by √|w_i·s_i| (s_i the adapter's LoRA scale), so a linear merge of one adapter is itself;
- ``cat``: A = [w_1·s_1·A_1; …], B = [B_1 … B_N], rank Σ r_i; exactly B·A = Σ w_i·ΔW_i;
- ``svd`` and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``:
  ΔW = combine(w_i, ΔW_i) (sparsified on ΔW for the latter), refactored by a truncated SVD to
  rank ``svd_rank`` (default: the largest input rank): B = U_r·S_r, A = V_rᵀ.

The merged adapter has lora_alpha = r, so its scale is 1 and B·A is the merged ΔW.
"""

from __future__ import annotations

import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch

from mergelab.adapters.peft_dir import PREFIX, LoraAdapter, LoraModule, require_peft, write_adapter
from mergelab.errors import MergelabError
from mergelab.outdir import atomic_directory

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = FACTOR_TYPES + ("cat",) + SVD_TYPES


def merge_adapters(adapters: Sequence[str | Path], weights: Sequence[float], out_dir: str | Path,
                   combination: str = "svd", svd_rank: int | None = None, density: float | None = None,
                   majority_sign_method: str = "total", svd_clamp: float | None = None, seed: int = 0,
                   force: bool = False, base_name: str | None = None) -> Path:
    """Combine LoRA adapters of one base into one PEFT adapter directory.

    Args:
        adapters: PEFT adapter directories trained on the same base model.
        weights: one weight per adapter (negative subtracts).
        out_dir: the adapter directory to create (it appears only when everything succeeded).
        combination: one of ``COMBINATIONS`` (PEFT's ``combination_type``).
        svd_rank: rank of the merged adapter for the ``svd`` types (default: the largest input rank).
        density: share of entries kept by ties/dare/magnitude_prune (required for them).
        majority_sign_method: ``total`` or ``frequency`` (ties, dare_ties).
        svd_clamp: quantile at which the SVD factors are clamped (PEFT's ``svd_clamp``), or None.
        seed: seed of DARE's random masks (each module draws from its own seeded generator).
        force: replace ``out_dir`` if it exists.
        base_name: ``base_model_name_or_path`` to record (default: the first adapter's).

    Returns:
        The adapter directory, loadable with ``PeftModel.from_pretrained(base, out_dir)``.

    Example:
        >>> merge_adapters(["adapters/math", "adapters/code"], [0.5, 0.5], "adapters/both",
        ...                combination="ties", density=0.5)  # doctest: +SKIP
    """
    _check_arguments(adapters, weights, combination, svd_rank, density, majority_sign_method, svd_clamp)
    with ExitStack() as stack:
        opened = [stack.enter_context(LoraAdapter(path)) for path in adapters]
        if len(opened) == 1:  # as PEFT: one adapter can only be rescaled
            combination = "linear"
        names = {adapter.base_name for adapter in opened} - {None}
        if len(names) > 1 and base_name is None:
            raise MergelabError(f"the adapters name different base models ({', '.join(sorted(names))}); merge "
                                f"adapters of one base (give base_name= / base_model: if these are one model)")
        rank = _output_rank(opened, combination, svd_rank)
        modules = _modules(opened)
        replaced = _replaced(opened)
        tensors: dict[str, torch.Tensor] = {}
        for name, entries in modules.items():
            chosen = [(opened[i], module, weights[i]) for i, module in entries]
            a, b = _combine_module(chosen, combination, rank, density, majority_sign_method, svd_clamp, seed)
            embedding = entries[0][1].kind == "embedding"
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            tensors[f"{PREFIX}{name}.{a_key}"] = a.contiguous()
            tensors[f"{PREFIX}{name}.{b_key}"] = b.contiguous()
        for name, (adapter, key) in replaced.items():
            tensors[PREFIX + name] = adapter.reader.get(key)
        config = _output_config(opened, rank, replaced, base_name)
        with atomic_directory(out_dir, force, inputs=[a.path for a in opened]) as tmp:
            write_adapter(tmp, config, tensors)
    return Path(out_dir)


def _check_arguments(adapters, weights, combination, svd_rank, density, majority_sign_method, svd_clamp) -> None:
    require_peft()
    if not adapters:
        raise MergelabError("give at least one adapter to merge")
    if len(weights) != len(adapters):
        raise MergelabError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if combination not in COMBINATIONS:
        raise MergelabError(f"combination '{combination}' is not one of {', '.join(COMBINATIONS)}")
    needs_density = combination not in ("linear", "cat", "svd")
    if needs_density and (not _number(density) or not 0 <= density <= 1):
        raise MergelabError(f"combination '{combination}' needs density in [0, 1] (the share of entries kept); "
                            f"got {density}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergelabError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise MergelabError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_clamp is not None and (not _number(svd_clamp) or not 0 < svd_clamp <= 1):
        raise MergelabError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_rank(adapter: LoraAdapter) -> int:
    pattern = adapter.config.get("rank_pattern") or {}
    return max([int(adapter.config.get("r", 8)), *pattern.values()])


def _output_rank(adapters: list[LoraAdapter], combination: str, svd_rank: int | None) -> int:
    ranks = [_config_rank(adapter) for adapter in adapters]
    for adapter in adapters:
        if adapter.config.get("use_dora"):
            raise MergelabError(f"adapter '{adapter.label}' is a DoRA adapter; merging DoRA adapters into one adapter "
                                f"is not supported (merge them into the base instead: BASE+ADAPTER)")
    if combination in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            listing = ", ".join(f"{a.label}: r={r}" for a, r in zip(adapters, ranks))
            raise MergelabError(f"combination '{combination}' needs adapters of one rank ({listing}); use cat or "
                                f"an svd combination for different ranks")
        return ranks[0]
    if combination == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _modules(adapters: list[LoraAdapter]) -> dict[str, list[tuple[int, LoraModule]]]:
    """Per module name, the (adapter index, module) of every adapter that adapts it; shapes must agree."""
    modules: dict[str, list[tuple[int, LoraModule]]] = {}
    shapes: dict[str, tuple[tuple[int, int], str, str]] = {}
    for index, adapter in enumerate(adapters):
        for module in adapter.modules.values():
            out_dim = adapter.reader.tensors[module.b_key].shape[0]
            in_dim = adapter.reader.tensors[module.a_key].shape[1]
            seen = shapes.setdefault(module.name, ((out_dim, in_dim), module.kind, adapter.label))
            if seen[:2] != ((out_dim, in_dim), module.kind):
                raise MergelabError(
                    f"module '{module.name}' is a {seen[1]} {seen[0][0]}x{seen[0][1]} layer in adapter '{seen[2]}' but "
                    f"a {module.kind} {out_dim}x{in_dim} layer in adapter '{adapter.label}'; the adapters must "
                    f"share one base model")
            modules.setdefault(module.name, []).append((index, module))
    return dict(sorted(modules.items()))


def _replaced(adapters: list[LoraAdapter]) -> dict[str, tuple[LoraAdapter, str]]:
    """modules_to_save tensors, each from the one adapter that has it (two are refused, as in PEFT)."""
    replaced: dict[str, tuple[LoraAdapter, str]] = {}
    for adapter in adapters:
        for name, key in adapter.replaced.items():
            if ".base_layer." in key:  # the frozen embedding PEFT saves beside an embedding LoRA: the base's own
                continue
            if name in replaced:
                raise MergelabError(f"adapters '{replaced[name][0].label}' and '{adapter.label}' both save tensor "
                                    f"'{name}' (modules_to_save); full tensors cannot be merged into an adapter")
            replaced[name] = (adapter, key)
    return replaced


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _combine_module(adapters_weights, combination, rank, density, majority_sign_method, svd_clamp, seed):
    """(A, B) of one module's merged LoRA from its (adapter, module, weight) triples."""
    from peft.utils import merge_utils

    if combination == "cat":
        a_parts = [adapter.reader.get(m.a_key).float() * (w * m.scale) for adapter, m, w in adapters_weights]
        b_parts = [adapter.reader.get(m.b_key).float() for adapter, m, w in adapters_weights]
        a, b = torch.cat(a_parts, 0), torch.cat(b_parts, 1)  # (Σr, in), (out, Σr)
        pad = rank - a.shape[0]  # a module only some adapters adapt: zero rows for the others' ranks
        return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))
    with torch.random.fork_rng(devices=[]):  # DARE draws from torch's global generator: seed it per module
        torch.manual_seed(_module_seed(seed, adapters_weights[0][1].name))
        if combination in FACTOR_TYPES:
            return _combine_factors(adapters_weights, combination, density, majority_sign_method, merge_utils)
        return _combine_svd(adapters_weights, combination, rank, density, majority_sign_method, svd_clamp,
                            merge_utils)


def _combine_factors(adapters_weights, combination, density, majority_sign_method, merge_utils):
    weights_a, weights_b, factors_a, factors_b = [], [], [], []
    for adapter, module, weight in adapters_weights:
        scaled = weight * module.scale
        root = abs(scaled) ** 0.5
        weights_a.append(root if scaled >= 0 else -root)  # the sign on one side only
        weights_b.append(root)
        factors_a.append(adapter.reader.get(module.a_key).float())
        factors_b.append(adapter.reader.get(module.b_key).float())
    merged = []
    for factors, factor_weights in ((factors_a, weights_a), (factors_b, weights_b)):
        merged.append(_apply(combination, factors, torch.tensor(factor_weights), density, majority_sign_method,
                             merge_utils))
    return merged[0], merged[1]


def _combine_svd(adapters_weights, combination, rank, density, majority_sign_method, svd_clamp, merge_utils):
    deltas = [adapter.delta(module) for adapter, module, _ in adapters_weights]  # in the base's layout, as PEFT
    weights = torch.tensor([weight for _, _, weight in adapters_weights])
    delta = _apply(combination.removesuffix("_svd") if combination != "svd" else "linear", deltas, weights, density,
                   majority_sign_method, merge_utils)
    del deltas
    if adapters_weights[0][1].kind != "linear":
        delta = delta.T  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b = u[:, :rank] * s[:rank]  # (out, r)
    a = vh[:rank]  # (r, in)
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    if a.shape[0] < rank:  # a layer narrower than the rank: zero rows beyond it
        pad = rank - a.shape[0]
        a, b = torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))
    return a, b


def _apply(combination, tensors, weights, density, majority_sign_method, merge_utils) -> torch.Tensor:
    if combination == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if combination == "ties":
        return merge_utils.ties(tensors, weights, density, majority_sign_method)
    if combination == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    if combination == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, density, majority_sign_method)
    return merge_utils.magnitude_prune(tensors, weights, density)


def _output_config(adapters: list[LoraAdapter], rank: int, replaced: dict, base_name: str | None) -> dict[str, Any]:
    first = adapters[0].config
    targets = [adapter.config.get("target_modules") for adapter in adapters]
    if all(isinstance(t, str) for t in targets):
        target_modules: Any = "|".join(f"({t})" for t in targets)
    else:
        target_modules = sorted({m for t in targets for m in ([t] if isinstance(t, str) else t or [])})
    saved = sorted({m for adapter in adapters for m in adapter.config.get("modules_to_save") or []})
    return {**first, "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False, "rank_pattern": {},
            "alpha_pattern": {}, "target_modules": target_modules, "modules_to_save": saved or None,
            "base_model_name_or_path": base_name or first.get("base_model_name_or_path"),
            "inference_mode": True}


ADAPTER_PARAMETERS = ("density", "svd_rank", "majority_sign_method", "svd_clamp")


def merge_adapters_config(config, out_dir: str | Path, options) -> Path:
    """A merge YAML with ``output: adapter``: ``merge_method`` is the combination type, each
    model an adapter directory or ``BASE+ADAPTER`` with an optional ``weight`` (default 1), and
    the top-level parameters are ``density``, ``svd_rank``, ``majority_sign_method``, ``svd_clamp``."""
    from mergelab.adapters.reader import adapter_input
    from mergelab.engine import _locate

    if config.merge_method not in COMBINATIONS:
        raise MergelabError(f"output: adapter merges with a PEFT combination type; merge_method "
                            f"'{config.merge_method}' is not one of {', '.join(COMBINATIONS)}")
    for name in config.parameters:
        if name not in ADAPTER_PARAMETERS + ("weight",):
            raise MergelabError(f"parameter '{name}' is not used by an adapter merge; its parameters are: "
                                f"{', '.join(ADAPTER_PARAMETERS)}, weight")
    adapters, weights, bases = [], [], set()
    for entry in config.models:
        found = adapter_input(entry.model, lambda ref: _locate(ref, config))
        if found is None:
            raise MergelabError(f"model '{entry.model}' is not a PEFT adapter; output: adapter merges adapters "
                                f"(an adapter directory or BASE+ADAPTER)")
        unknown = set(entry.parameters) - {"weight"}
        if unknown:
            raise MergelabError(f"parameter '{sorted(unknown)[0]}' of model '{entry.model}' is not used by an "
                                f"adapter merge; the per-model parameter is: weight")
        weight = entry.parameters.get("weight", config.parameters.get("weight", 1.0))
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise MergelabError(f"weight of model '{entry.model}' must be a number for an adapter merge, "
                                f"got {weight!r}")
        adapters.append(found[1])
        weights.append(float(weight))
        bases.add(found[0].resolve())
    if len(bases) > 1:
        raise MergelabError(f"the adapters are on different base models ({', '.join(map(str, sorted(bases)))}); "
                            f"merge adapters of one base")
    params = {name: config.parameters[name] for name in ADAPTER_PARAMETERS if name in config.parameters}
    base_name = config.base_model or (str(next(iter(bases))) if bases else None)
    return merge_adapters(adapters, weights, out_dir, combination=config.merge_method, seed=options.seed,
                          force=options.force, base_name=base_name, **params)
