"""Sparsifying a task vector: keep its largest entries (TIES), its mid-range entries
(Breadcrumbs), a uniform random subset (DARE) or a magnitude-ranked random subset (DELLA).

Counts follow mergekit: a top-k keeps k = int(density·numel) entries. Every random draw
depends only on (seed, model index, tensor name), so DARE and DELLA masks are the same for any
thread count or device.
"""

from __future__ import annotations

import enum
import functools
import hashlib

import numpy as np
import torch


class Sparsify(enum.Enum):
    """How a task vector is thinned before it is combined."""

    MAGNITUDE = "magnitude"  # TIES trim: keep the top-k entries by |τ|
    RANDOM = "random"  # DARE: keep each entry with probability density
    OUTLIERS = "magnitude_outliers"  # Breadcrumbs: drop the top gamma and the bottom, keep density
    DELLA = "della_magprune"  # DELLA: keep with probability ranked by |τ| within each row


class Rescale(enum.Enum):
    """How the survivors of a sparsified task vector are scaled back up."""

    KEEP_PROBABILITY = "keep_probability"  # divide each survivor by its keep probability (DARE, DELLA papers)
    L1 = "l1"  # scale the whole tensor so its L1 norm is what it was before thinning (mergekit)


def magnitude_threshold(magnitudes: torch.Tensor, k: int) -> float:
    """The exact k-th largest value of a flat non-negative float32 tensor.

    A full sort or ``torch.topk`` costs seconds on a 65M-entry embedding on CPU. Non-negative
    IEEE floats order like their bit patterns read as integers, so a histogram of the top 16
    bits finds the bucket that holds the k-th largest value in one pass; an exact
    ``kthvalue`` over that bucket alone (typically ~0.3% of the entries) finishes the job.
    """
    n = magnitudes.numel()
    if k >= n:
        return 0.0
    if k <= 0:
        return float("inf")
    # The top 16 bits of each (little-endian) float32, as int16. The
    # sign bit is 0, so they read as 0..32767 and order like the values.
    high = magnitudes.view(torch.int16)[1::2].contiguous()  # (n,); a strided view costs bincount twice
    counts = torch.bincount(high, minlength=1 << 15)  # (32768,)
    from_top = counts.flip(0).cumsum(0)
    rank = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype, device=from_top.device)).item())
    bucket = (1 << 15) - 1 - rank
    above = int(from_top[rank - 1].item()) if rank > 0 else 0
    candidates = magnitudes[high == bucket]
    needed = k - above  # how many of the bucket's entries are in the top k
    return float(torch.kthvalue(candidates, candidates.numel() - needed + 1).values.item())


def top_k_mask(magnitudes: torch.Tensor, k: int, keep_ties: bool) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a flat non-negative float32 tensor.

    ``keep_ties``: every entry equal to the k-th largest is kept too, so the result never
    depends on the order in which equal values are stored; otherwise exactly k entries are
    kept, the tied ones first in storage order. Zeros are never kept (they change nothing).
    """
    n = magnitudes.numel()
    if k >= n:
        return magnitudes > 0
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold = magnitude_threshold(magnitudes, k)
    if threshold == 0:
        return magnitudes > 0
    if keep_ties:
        return magnitudes >= threshold
    keep = magnitudes > threshold
    tied = magnitudes == threshold
    room = k - int(keep.sum())  # how many of the tied entries still fit
    keep |= tied & (tied.to(torch.int32).cumsum(0, dtype=torch.int32) <= room)
    return keep


def magnitude_mask(delta: torch.Tensor, density: float, keep_ties: bool = True) -> torch.Tensor:
    """Boolean mask of the top k = int(density·numel) entries of ``delta`` by absolute value
    (TIES trim); see ``top_k_mask`` for ``keep_ties``."""
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    magnitudes = delta.reshape(-1).abs().float()
    return top_k_mask(magnitudes, int(density * magnitudes.numel()), keep_ties).reshape(delta.shape)


SMALLEST_SUBNORMAL = 2.0**-149  # the least positive float32


def magnitude_trim_(delta: torch.Tensor, density: float, keep_ties: bool = True,
                    scratch: torch.Tensor | None = None) -> torch.Tensor:
    """TIES trim in place: zero all but the top k = int(density·numel) entries of ``delta`` by
    absolute value (``delta * magnitude_mask(delta, density, keep_ties)``, bit for bit).

    ``scratch``: a float32 buffer of ``delta``'s size to hold |delta| (one is allocated when it
    is None or the wrong size); it is returned, so a caller trimming several task vectors pays
    for one allocation. With ``keep_ties`` the mask is made in that buffer (|delta| >= the
    threshold, as 1.0/0.0) and multiplied in: no boolean tensor, no conversion of one.
    """
    if density >= 1.0:
        return scratch
    flat = delta.reshape(-1)
    if scratch is None or scratch.numel() != flat.numel() or scratch.device != delta.device:
        scratch = torch.empty(flat.shape, dtype=torch.float32, device=delta.device)
    magnitudes = torch.abs(flat, out=scratch) if flat.dtype == torch.float32 else scratch.copy_(flat.abs())
    k = int(density * magnitudes.numel())
    if not keep_ties:
        flat.mul_(top_k_mask(magnitudes, k, keep_ties=False))
        return scratch
    if k <= 0:
        flat.mul_(0.0)
        return scratch
    threshold = magnitude_threshold(magnitudes, k)
    # Zeros are never kept: a threshold of 0 (k spans every non-zero entry) becomes the
    # smallest positive float32, so that >= means > 0.
    keep = magnitudes.ge_(max(threshold, SMALLEST_SUBNORMAL))  # 1.0 where kept, 0.0 elsewhere (NaN: 0.0)
    flat.mul_(keep)
    return scratch


def outlier_mask(delta: torch.Tensor, density: float, gamma: float, keep_ties: bool = True) -> torch.Tensor:
    """Model Breadcrumbs: drop the top int(gamma·numel) entries by |τ| and as many of the
    smallest as it takes to keep int(density·numel); when gamma + density > 1, fewer of the
    largest are dropped so that density is still met. With ``keep_ties``, entries tied at the
    upper boundary are all dropped and those tied at the lower one all kept."""
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    magnitudes = delta.reshape(-1).abs().float()  # (numel,)
    n = magnitudes.numel()
    kept = int(density * n)
    top = min(int(gamma * n), n - kept)
    keep = top_k_mask(magnitudes, top + kept, keep_ties)
    if top > 0:
        keep &= ~top_k_mask(magnitudes, top, keep_ties)
    return keep.reshape(delta.shape)


def mask_seed(seed: int, model_index: int, key: str) -> int:
    """A 63-bit seed that depends only on (seed, model index, tensor name)."""
    digest = hashlib.blake2b(f"{seed}\x00{model_index}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_mask(shape: torch.Size, density: float, seed: int, model_index: int, key: str) -> torch.Tensor:
    """Bernoulli(density) keep-mask, drawn on the CPU so every device gets the same one."""
    return dare_uniform(shape, seed, model_index, key) < density


ROW_BLOCK = 1 << 22  # entries ranked at a time by DELLA: bounds the int64 sort buffers to ~64 MB


def della_(delta: torch.Tensor, density: float, epsilon: float, rescale: Rescale | None, seed: int,
           model_index: int, key: str) -> torch.Tensor:
    """DELLA's MagPrune, in place: within each row (a 1-D tensor is one row), the entry of
    rank r (0 = smallest |τ|, n−1 = largest) is kept with probability
    p_r = density − ε + 2ε·r/(n−1), then survivors are divided by p_r (``KEEP_PROBABILITY``).

    The uniform draws are DARE's (``dare_uniform``), so with ε = 0 this is exactly DARE.
    Ties in |τ| are ranked in storage order.
    """
    # Probabilities and draws stay float32, as DARE's, so ε = 0 draws DARE's mask bit for bit.
    draws = dare_uniform(delta.shape, seed, model_index, key).to(delta.device)
    rows = delta.view(delta.shape[0], -1) if delta.dim() > 1 else delta.view(1, -1)  # (rows, n), a view
    draws = draws.view(rows.shape)
    n = rows.shape[1]
    ramp = keep_ramp(n, density, epsilon, delta.device)
    from mergelab.methods import compiled_topk  # the same masking in one compiled pass, where numba is

    if compiled_topk.della_trim_(rows, draws, ramp, rescale is Rescale.KEEP_PROBABILITY):
        return delta
    block = max(1, ROW_BLOCK // max(n, 1))
    for start in range(0, rows.shape[0], block):
        part = rows[start:start + block]
        order = _rank_order(part)  # (block, n): rank -> position
        keep_probability = torch.empty(part.shape, device=delta.device).scatter_(1, order, ramp.expand(part.shape))
        part.mul_(draws[start:start + block] < keep_probability)
        if rescale is Rescale.KEEP_PROBABILITY:
            part.div_(keep_probability)
    return delta


def keep_ramp(n: int, density: float, epsilon: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """DELLA's keep probability by rank within a row of ``n`` entries (float32, as DARE's draws):
    density − ε + 2ε·r/(n−1) for r = 0 (smallest |τ|) .. n−1."""
    step = 2 * epsilon / (n - 1) if n > 1 else 0.0
    return torch.arange(n, device=device, dtype=torch.float32).mul_(step).add_(density - epsilon)


def della_merge(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float], density: list[float],
                epsilon: list[float], rescale: Rescale | None, seed: int, key: str, consensus: bool,
                normalize: bool, lam: float) -> torch.Tensor | None:
    """θ_b + λ · combine(w_i · della_(τ_i)) in compiled loops, bit for bit the torch kernel's:
    per task vector, τ, DARE's draws (torch's generator stream, reproduced), the per-row ranks
    and the keep/rescale in one pass over each row; then TIES's sign election and disjoint mean
    (``consensus``, TIES's own compiled ``combine``) or the weighted sum, λ and the base in one
    pass. Overwrites ``tensors`` (the result lives in the first one's buffer). None, with nothing
    touched, where the loops do not apply (numba missing, not float32 CPU contiguous, smaller than
    ``fused.MIN_NUMEL``, the L1 rescale, weights that cannot be normalized): then the caller runs
    the torch kernel."""
    from mergelab.methods import fused

    if rescale is Rescale.L1 or not fused.usable(tensors, base):  # (usable imports numba only for large tensors)
        return None
    della_kernels = fused.compiled("_della_kernels")
    if della_kernels is None or not _draws_reproduced():
        return None
    if not consensus and normalize and abs(sum(weight)) < 1e-12:
        return None  # the torch kernel's error message
    base_rows = (base.view(base.shape[0], -1) if base.dim() > 1 else base.view(1, -1)).numpy()  # (rows, n)
    n = base_rows.shape[1]
    for index, tensor in enumerate(tensors):
        expert = tensor.view(base_rows.shape).numpy()  # a view: thinned in place
        if density[index] >= 1.0:  # nothing thinned, no draws (as sparsify_)
            della_kernels.difference_rows(expert, base_rows)
            continue
        ramp = keep_ramp(n, density[index], epsilon[index]).numpy()
        state = della_kernels.mt_seed(mask_seed(seed, index, key))
        della_kernels.sparsify_rows(expert, base_rows, state, ramp, bool(ramp[0] != ramp[-1]),
                                    rescale is Rescale.KEEP_PROBABILITY, della_kernels.bucket_bits(n))
    deltas = tuple(t.reshape(-1).numpy() for t in tensors)
    base_flat = base.reshape(-1).numpy()
    if consensus:  # TIES's combine with nothing left to trim: a threshold of −inf keeps every entry
        fused.consensus_combine(deltas, np.full(len(deltas), -np.inf, dtype=np.float32), weight, lam, normalize,
                                base_flat)
    else:
        della_kernels.weighted_sum(deltas, np.asarray(weight, dtype=np.float32), np.float32(sum(weight)), normalize,
                                   np.float32(lam), base_flat, deltas[0])
    return tensors[0]


@functools.cache
def _draws_reproduced() -> bool:
    """Whether the compiled generator gives ``torch.rand``'s numbers (checked once per process on
    a short stream; where a torch release changes its generator, the torch kernel runs)."""
    from mergelab.methods import fused

    della_kernels = fused.compiled("_della_kernels")
    seed = mask_seed(0, 1, "check")
    expected = torch.rand(1000, generator=torch.Generator(device="cpu").manual_seed(seed)).numpy()
    drawn = np.empty(1000, dtype=np.float32)
    della_kernels.draw_row(della_kernels.mt_seed(seed), drawn)
    return bool(np.array_equal(drawn, expected))


def _rank_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the positions in increasing order of |value| (ties in storage order): a stable
    argsort. On the CPU, numpy's vectorized sort of (float32 bits << 32 | column) keys is about
    twice as fast as ``torch.argsort`` and gives the same order."""
    if rows.device.type != "cpu":
        return torch.argsort(rows.abs().float(), dim=1, stable=True)
    keys = rows.abs().float().numpy().view(np.int32).astype(np.int64)  # non-negative floats order like their bits
    keys <<= 32
    keys |= np.arange(rows.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    keys &= 0xFFFFFFFF
    return torch.from_numpy(keys)


def dare_uniform(shape: torch.Size, seed: int, model_index: int, key: str) -> torch.Tensor:
    """The uniform draws behind DARE's and DELLA's masks (CPU, float32)."""
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, model_index, key))
    return torch.rand(shape, generator=generator)


def l1_rescale_(masked: torch.Tensor, l1_before: float, eps: float = 1e-7) -> torch.Tensor:
    """Scale a thinned tensor in place so its L1 norm is ``l1_before`` again (mergekit's rescale);
    left as is when either norm is below ``eps``."""
    l1_after = float(masked.abs().sum())
    if l1_before >= eps and l1_after >= eps:
        masked.mul_(l1_before / l1_after)
    return masked


def sparsify_(delta: torch.Tensor, how: Sparsify, density: float, *, rescale: Rescale | None,
              gamma: float | None = None, epsilon: float | None = None, keep_ties: bool = True,
              seed: int | None = None, model_index: int = 0, key: str | None = None) -> torch.Tensor:
    """Thin one task vector in place; density ≥ 1 leaves it untouched (as in mergekit)."""
    if density >= 1.0:
        return delta
    l1_before = float(delta.abs().sum()) if rescale is Rescale.L1 else 0.0
    if how is Sparsify.MAGNITUDE:
        magnitude_trim_(delta, density, keep_ties)
    elif how is Sparsify.OUTLIERS:
        from mergelab.methods import compiled_topk  # the same mask in three compiled passes, where numba is

        if not compiled_topk.outlier_trim_(delta, density, gamma, keep_ties):
            delta.mul_(outlier_mask(delta, density, gamma, keep_ties))
    elif how is Sparsify.RANDOM:
        delta.mul_(dare_mask(delta.shape, density, seed, model_index, key).to(delta.device))
        if rescale is Rescale.KEEP_PROBABILITY:
            delta.div_(density)
    elif how is Sparsify.DELLA:
        della_(delta, density, epsilon, rescale, seed, model_index, key)
    return l1_rescale_(delta, l1_before) if rescale is Rescale.L1 else delta
