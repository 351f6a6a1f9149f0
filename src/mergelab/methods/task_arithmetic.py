"""Task Arithmetic, TIES, DARE, Model Breadcrumbs and DELLA as configurations of one function
over task vectors.

θ = θ_b + λ · combine(sparsify(τ_i) · w_i), τ_i = θ_i − θ_b, where
- ``sparsify``: None (Task Arithmetic), ``Sparsify.MAGNITUDE`` (TIES trim: top-k by |τ|,
  k = int(density·numel)), ``Sparsify.OUTLIERS`` (Breadcrumbs: drop the top ``gamma`` and the
  bottom, keep density), ``Sparsify.RANDOM`` (DARE: keep each entry with probability density)
  or ``Sparsify.DELLA`` (keep probabilities ranked by |τ| within a row, density ± ``epsilon``);
- ``rescale``: scale the survivors back up: for DARE/DELLA by 1/keep-probability as their papers
  do, or to the task vector's L1 norm (``rescale_l1``, mergekit's rescale); for TIES and
  Breadcrumbs ``rescale`` always means the L1 rescale (mergekit's; their papers have none);
- ``consensus``: None (plain sum) or ``Consensus.SIGN`` (TIES elect: γ = sgn Σ_i w_i τ̂_i, and
  only entries whose sign agrees with γ are combined; zeros never vote);
- ``normalize``: divide by the sum of the weights that took part (per entry under consensus),
  which turns the TIES disjoint sum into the paper's disjoint mean.

Weights scale τ̂_i *before* the sign election, as mergekit does (the TIES paper has no weights).
"""

from __future__ import annotations

import enum

import torch

from mergelab.errors import MergelabError
from mergelab.methods import fused
from mergelab.methods.sparsify import Rescale, Sparsify, della_merge, magnitude_trim_, sparsify_


class Consensus(enum.Enum):
    """How the (sparsified, weighted) task vectors are combined."""

    SIGN = "sign"  # TIES: elect a sign per entry, combine only the entries that agree with it


def generalized_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    normalize: bool,
    sparsify: Sparsify | None,
    consensus: Consensus | None,
    density: list[float] | None,
    rescale: bool | None,
    rescale_l1: bool | None,
    gamma: list[float] | None,
    epsilon: list[float] | None,
    keep_ties: bool | None,
    seed: int | None,
    key: str | None,
    **scale: float,
) -> torch.Tensor:
    """θ_b + λ · combine(w_i · sparsify(τ_i)); ``scale`` holds ``lambda`` (a Python keyword).

    ``density`` and ``rescale`` are needed with ``sparsify``; ``keep_ties`` with the magnitude
    ones (MAGNITUDE, OUTLIERS), ``gamma`` with OUTLIERS, ``epsilon`` with DELLA, and
    ``rescale_l1``, ``seed`` and ``key`` (the tensor name) with the random ones (RANDOM, DELLA);
    the registry passes None for those a configuration does not use. No parameter has a
    default here: defaults live in the registry (``mergelab.methods``).
    """
    sparsify = None if sparsify is None else Sparsify(sparsify)  # a typo fails here, not silently
    consensus = None if consensus is None else Consensus(consensus)
    if "lambda" not in scale:
        raise TypeError("generalized_task_arithmetic() missing required keyword argument: 'lambda'")
    lam = scale.pop("lambda")
    if scale:
        raise TypeError(f"unexpected parameters {sorted(scale)}")
    needs = {"density": density, "rescale": rescale}
    if sparsify in (Sparsify.MAGNITUDE, Sparsify.OUTLIERS):
        needs.update(keep_ties=keep_ties, gamma=gamma if sparsify is Sparsify.OUTLIERS else 0.0)
    if sparsify in (Sparsify.RANDOM, Sparsify.DELLA):
        needs.update(rescale_l1=rescale_l1, seed=seed, key=key,
                     epsilon=epsilon if sparsify is Sparsify.DELLA else 0.0)
    missing = [name for name, value in needs.items() if value is None]
    if sparsify is not None and missing:
        raise TypeError(f"sparsify={sparsify.value!r} needs {', '.join(missing)}")
    how = None
    if sparsify is not None and rescale:
        random = sparsify in (Sparsify.RANDOM, Sparsify.DELLA)
        how = Rescale.KEEP_PROBABILITY if random and not rescale_l1 else Rescale.L1
    if (sparsify is Sparsify.MAGNITUDE and consensus is Consensus.SIGN and how is None and keep_ties
            and fused.usable(tensors, base)):  # TIES in three compiled passes, bit for bit the same
        return fused.ties(tensors, base, weight, density, True, lam, normalize)
    if sparsify is Sparsify.DELLA:  # DELLA in compiled loops where they apply, bit for bit the same
        merged = della_merge(tensors, base, weight=weight, density=density, epsilon=epsilon, rescale=how, seed=seed,
                             key=key, consensus=consensus is Consensus.SIGN, normalize=normalize, lam=lam)
        if merged is not None:
            return merged
    scratch = None  # |τ| for the TIES trim, one buffer for every expert
    for index, w in enumerate(weight):
        delta = tensors[index].sub_(base)  # τ_i, in the expert's own buffer
        if sparsify is Sparsify.MAGNITUDE and how is None:
            scratch = magnitude_trim_(delta, density[index], bool(keep_ties), scratch)
        elif sparsify is not None:
            sparsify_(delta, sparsify, density[index], rescale=how, keep_ties=bool(keep_ties),
                      gamma=gamma[index] if gamma else None, epsilon=epsilon[index] if epsilon else None,
                      seed=seed, model_index=index, key=key)
        if w != 1.0:  # x·1.0 is x exactly: skip the pass
            delta.mul_(w)
    del scratch
    merged = _sign_consensus(tensors, weight, normalize) if consensus else _plain_sum(tensors, weight, normalize)
    return (merged if lam == 1.0 else merged.mul_(lam)).add_(base)


def _plain_sum(deltas: list, weight: list[float], normalize: bool) -> torch.Tensor:
    merged = deltas[0]
    for index in range(1, len(deltas)):
        merged.add_(deltas[index])
        deltas[index] = None  # release as we go: the caller hands its buffers over
    if not normalize:
        return merged
    total = sum(weight)
    if abs(total) < 1e-12:  # the plan refuses this first (check_normalizable); never divide by 1 instead
        raise MergelabError(f"weights {weight} sum to zero and cannot be normalized; change the weights "
                            f"or set normalize: false")
    return merged.div_(total)


def _sign_consensus(deltas: list, weight: list[float], normalize: bool) -> torch.Tensor:
    """TIES elect + disjoint sum (or mean), bit for bit the straightforward
    Σ_i τ̂_i·[sgn τ̂_i = γ] / Σ_i w_i·[sgn τ̂_i = γ] with γ = sgn Σ_i τ̂_i (+ where the sum is 0).

    Two passes over the task vectors, in place, with one extra float tensor (γ as ±1) and a
    count. Election and disjoint sum are fused by flipping each τ̂_i to γ's sign: the entries
    that agree are then exactly the positive ones, so ``clamp(min=0)`` selects them and the sum
    of the flipped survivors is |Σ agreeing τ̂_i| (negation is exact, so no rounding changes).
    """
    sign = deltas[0].clone()  # Σ_i τ̂_i, summed in model order (its sign is the election)
    for delta in deltas[1:]:
        sign.add_(delta)
    sign.ge_(0).mul_(2).sub_(1)  # γ: +1 where the sum is >= 0 (ties go to +), -1 elsewhere (NaN: -1)
    equal_weights = len(set(weight)) == 1 and len(weight) < 256
    merged = count = kept = None
    for index, w in enumerate(weight):
        flipped = deltas[index].mul_(sign).clamp_(min=0)  # |τ̂_i| where it agrees with γ, else 0
        deltas[index] = None  # release as we go: the caller hands its buffers over
        if normalize:  # how much weight agreed, per entry
            if equal_weights:
                kept = torch.gt(flipped, 0, out=kept)
                count = kept.to(torch.uint8) if count is None else count.add_(kept.view(torch.uint8))
            else:
                agreed = torch.sign(flipped)  # 1.0 where it agrees (flipped > 0), else 0.0
                count = agreed.mul_(w) if count is None else count.add_(agreed, alpha=w)
        merged = flipped if merged is None else merged.add_(flipped)
    merged.mul_(sign).add_(0.0)  # back to γ's sign; + 0.0 turns -0.0 into 0.0, as a sum from 0 does
    if normalize:
        if equal_weights and weight[0] > 0:  # no agreement: merged is 0 there, divided by w instead of 1
            merged.div_(count.clamp_(min=1).to(merged.dtype).mul_(weight[0]))
        else:
            scale = count.to(merged.dtype).mul_(weight[0]) if equal_weights else count
            merged.div_(scale.masked_fill_(scale == 0, 1.0))
    return merged
