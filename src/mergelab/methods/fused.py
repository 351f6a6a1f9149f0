"""TIES in two passes over memory (three when a guess misses), compiled with numba (optional:
``pip install 'mergelab[fast]'``).

The torch kernel (``task_arithmetic._sign_consensus`` and ``sparsify.magnitude_trim_``) is a
dozen elementwise passes per task vector, each a separate trip through memory: on the 748M
benchmark that is several times the read+convert+write floor. These loops do the same
arithmetic, in the same order:

1. per task vector: τ = θ_i − θ_b in place, the histogram of the top 16 bits of |τ|, and |τ|
   of the entries in the few buckets that a sample says will hold the trim threshold;
2. only when the threshold's bucket is not among them: a pass collecting that bucket's entries
   (a fraction of a percent); its exact k-th value is the threshold (as
   ``sparsify.magnitude_threshold``), read from a histogram of the low 16 bits;
3. once, over all task vectors together, entry by entry: trim, weight, the sign sum, the
   agreeing sum and count, the disjoint mean, λ and the base.

Every float operation is the torch kernel's, in its order, without fast-math (no reassociation,
no fused multiply-add), so the result is bit for bit the same; ``tests/test_ties_kernel.py``
checks it. Used for float32 CPU tensors of at least ``MIN_NUMEL`` entries when numba is
installed; otherwise, and for everything else, the torch kernel runs.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import torch

MIN_NUMEL = 1 << 16  # below this, compiling (once per process) is not worth it


@functools.cache
def compiled(module: str):
    """A module of compiled loops in ``mergelab.methods`` (``_fused_kernels``, ``_sce_kernels``), or
    None without numba."""
    try:
        return importlib.import_module(f"mergelab.methods.{module}")
    except ImportError:
        return None


def _kernels():
    """TIES's compiled passes over the task vectors (histogram, bucket values), or None without numba."""
    kernels = compiled("_fused_kernels")
    return None if kernels is None else (kernels.delta_histogram, kernels.bucket_values)


def available() -> bool:
    return _kernels() is not None


def usable(tensors: list[torch.Tensor], base: torch.Tensor | None) -> bool:
    """Whether the compiled path applies: float32 CPU contiguous tensors, large enough, numba there."""
    if base is None or base.numel() < MIN_NUMEL or base.dtype != torch.float32 or base.device.type != "cpu":
        return False
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.shape == base.shape
               for t in tensors) or not base.is_contiguous():
        return False
    return available()


CANDIDATES_SHARE = 16  # pass 1 keeps at most 1/16 of the entries as threshold candidates
CANDIDATES_MIN = 4096
SAMPLE = 1 << 15  # entries sampled to guess the threshold's buckets


def _likely_buckets(expert: np.ndarray, base: np.ndarray, k: int) -> tuple[int, int]:
    """The histogram buckets (top 16 bits of |τ|) that very likely hold the k-th largest |τ|,
    from an evenly spaced sample of τ: the sample's quantiles a few standard errors either side
    of 1 − k/n. A wrong guess costs time (pass 2), never a different result."""
    step = max(1, expert.size // SAMPLE)
    sample = np.empty(-(-expert.size // step), dtype=np.float32)  # (≤ SAMPLE,)
    compiled("_fused_kernels").sample_magnitudes(expert, base, step, sample)
    m = sample.size
    quantile = 1.0 - k / expert.size
    margin = 4.0 * (quantile * (1.0 - quantile) / m) ** 0.5 + 2.0 / m
    ranks = [min(m - 1, max(0, int((quantile + side * margin) * m))) for side in (-1.0, 1.0)]
    low, high = np.partition(sample, ranks)[ranks].view(np.uint32) >> 16
    return int(low), int(high)


def _kth_largest_in_bucket(values: np.ndarray, bucket: int, needed: int) -> float:
    """The ``needed``-th largest of those ``values`` (non-negative floats) whose top 16 bits are
    ``bucket``: by a histogram of their low 16 bits (a bucket holds up to a few percent of a
    tensor; a partial sort of it cost several times more)."""
    return float(np.uint32(compiled("_fused_kernels").kth_in_bucket(values, bucket, needed)).view(np.float32))


def ties(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float], density: list[float],
         keep_ties: bool, lam: float, normalize: bool) -> torch.Tensor:
    """θ_b + λ · TIES(τ_i) with magnitude trim (keep_ties) and sign consensus; bit for bit the
    torch kernel's result. Overwrites ``tensors`` (the result lives in the first one's buffer)."""
    from mergelab.methods.sparsify import SMALLEST_SUBNORMAL

    delta_histogram, bucket_values = _kernels()
    base_flat = base.reshape(-1).numpy()
    deltas = [t.reshape(-1).numpy() for t in tensors]
    thresholds = np.zeros(len(deltas), dtype=np.float32)
    for index, delta in enumerate(deltas):
        n, k = delta.size, int(density[index] * delta.size)
        trims = density[index] < 1.0 and 0 < k < n
        low, high = _likely_buckets(delta, base_flat, k) if trims else (1 << 15, 1 << 15)  # (no bucket)
        candidates = np.empty(min(n, max(CANDIDATES_MIN, n // CANDIDATES_SHARE)) if trims else 0, dtype=np.float32)
        counts, found, complete = delta_histogram(delta, base_flat, low, high, candidates)
        if density[index] >= 1.0:
            thresholds[index] = -np.inf  # no trim: every entry passes |d| >= -inf (NaN too? see below)
        elif k >= n:
            thresholds[index] = SMALLEST_SUBNORMAL
        elif k <= 0:
            thresholds[index] = np.inf
        else:
            from_top = np.cumsum(counts[::-1])
            rank = int(np.searchsorted(from_top, k))
            bucket = (1 << 15) - 1 - rank
            above = int(from_top[rank - 1]) if rank > 0 else 0
            if complete and low <= bucket <= high:  # pass 1 kept the bucket's entries: no pass 2
                values = candidates[:found]  # (the window's: kth_in_bucket reads the bucket's among them)
            else:
                values = bucket_values(delta, bucket, int(counts[bucket]))
            thresholds[index] = max(_kth_largest_in_bucket(values, bucket, k - above), SMALLEST_SUBNORMAL)
    consensus_combine(deltas, thresholds, weight, lam, normalize, base_flat)
    return tensors[0]


def consensus_combine(deltas: list[np.ndarray], thresholds: np.ndarray, weight: list[float], lam: float,
                      normalize: bool, base_flat: np.ndarray) -> None:
    """TIES's sign election and disjoint mean of the task vectors ``deltas`` (each entry kept where
    |τ| ≥ its model's threshold; −inf keeps all), times λ, plus the base, into ``deltas[0]``. Equal
    positive weights with the mean take their own loop (no per-entry weight branches)."""
    kernels = compiled("_fused_kernels")
    weights = np.asarray(weight, dtype=np.float32)
    equal = len(set(weight)) == 1 and len(weight) < 256
    if equal and normalize and weights[0] > 0:
        kernels.combine_equal_mean(tuple(deltas), thresholds, weights[0], np.float32(lam), base_flat, deltas[0])
    else:
        kernels.combine(tuple(deltas), thresholds, weights, np.float32(lam), normalize, equal, base_flat, deltas[0])
