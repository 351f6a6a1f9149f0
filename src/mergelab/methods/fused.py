"""TIES in three passes over memory, compiled with numba (optional: ``pip install 'mergelab[fast]'``).

The torch kernel (``task_arithmetic._sign_consensus`` and ``sparsify.magnitude_trim_``) is a
dozen elementwise passes per task vector, each a separate trip through memory: on the 748M
benchmark that is several times the read+convert+write floor. These loops do the same
arithmetic, in the same order, in three passes:

1. per task vector: τ = θ_i − θ_b in place, and the histogram of the top 16 bits of |τ|;
2. per task vector: the entries of the threshold's histogram bucket (a fraction of a percent),
   whose exact k-th value is the trim threshold (as ``sparsify.magnitude_threshold``);
3. once, over all task vectors together, entry by entry: trim, weight, the sign sum, the
   agreeing sum and count, the disjoint mean, λ and the base.

Every float operation is the torch kernel's, in its order, without fast-math (no reassociation,
no fused multiply-add), so the result is bit for bit the same; ``tests/test_ties_kernel.py``
checks it. Used for float32 CPU tensors of at least ``MIN_NUMEL`` entries when numba is
installed; otherwise, and for everything else, the torch kernel runs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

MIN_NUMEL = 1 << 16  # below this, compiling (once per process) is not worth it


@functools.cache
def _kernels():
    """The compiled loops, or None without numba."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=True, nogil=True)
    def delta_histogram(expert, base):  # pass 1
        counts = np.zeros(1 << 15, dtype=np.int64)
        bits = expert.view(np.uint32)
        for i in range(expert.size):
            expert[i] = expert[i] - base[i]
            counts[(bits[i] >> 16) & 0x7FFF] += 1
        return counts

    @numba.njit(cache=True, nogil=True)
    def bucket_values(delta, bucket, count):  # pass 2
        values = np.empty(count, dtype=np.float32)
        bits = delta.view(np.uint32)
        found = 0
        for i in range(delta.size):
            if ((bits[i] >> 16) & 0x7FFF) == bucket and found < count:  # (count is exact: never full early)
                values[found] = abs(delta[i])
                found += 1
        return values

    @numba.njit(cache=True, nogil=True, inline="always")
    def trimmed(value, threshold, weight):
        # (x·1.0 is x exactly, so multiplying by a weight of 1 is what skipping it gives)
        return value * (np.float32(1.0) if abs(value) >= threshold else np.float32(0.0)) * weight

    @numba.njit(cache=True, nogil=True, inline="always")
    def agreeing(value, threshold, weight, sign):  # clamp(τ̂·γ, min=0), NaN kept
        flipped = trimmed(value, threshold, weight) * sign
        return flipped if (flipped > 0 or flipped != flipped) else np.float32(0.0)

    @numba.njit(cache=True, nogil=True)
    def combine(deltas, thresholds, weights, lam, normalize, equal_weights, base, out):  # pass 3
        experts, size, block = len(deltas), base.size, 4096
        sign = np.empty(block, dtype=np.float32)
        merged = np.empty(block, dtype=np.float32)
        count = np.empty(block, dtype=np.float32)  # agreeing weight (unequal weights)
        kept = np.empty(block, dtype=np.float32)  # agreeing models (equal weights), exact as a float
        for start in range(0, size, block):
            width = min(block, size - start)
            first, threshold, weight = deltas[0], thresholds[0], weights[0]
            for j in range(width):  # the sign sum, in model order
                sign[j] = trimmed(first[start + j], threshold, weight)
            for e in range(1, experts):
                delta, threshold, weight = deltas[e], thresholds[e], weights[e]
                for j in range(width):
                    sign[j] = sign[j] + trimmed(delta[start + j], threshold, weight)
            for j in range(width):  # γ: +1 where the sum is >= 0, -1 elsewhere (NaN too, as ge_ gives)
                sign[j] = np.float32(1.0) if sign[j] >= 0 else np.float32(-1.0)
            for e in range(experts):  # the agreeing entries, flipped to γ's sign, and how many
                delta, threshold, weight = deltas[e], thresholds[e], weights[e]
                for j in range(width):
                    flipped = agreeing(delta[start + j], threshold, weight, sign[j])
                    hit = np.float32(1.0) if flipped > 0 else np.float32(0.0)
                    if e == 0:
                        merged[j] = flipped
                        kept[j] = hit
                    else:
                        merged[j] = merged[j] + flipped
                        kept[j] = kept[j] + hit
                if not equal_weights:  # torch.sign(flipped)·w summed: NaN where flipped is NaN
                    for j in range(width):
                        flipped = agreeing(delta[start + j], threshold, weight, sign[j])
                        agreed = flipped if flipped != flipped else (np.float32(1.0) if flipped > 0
                                                                     else np.float32(0.0))
                        count[j] = agreed * weight if e == 0 else count[j] + weight * agreed
            for j in range(width):
                value = merged[j] * sign[j] + np.float32(0.0)
                if normalize:
                    if equal_weights and weights[0] > 0:
                        value = value / (max(kept[j], np.float32(1.0)) * weights[0])
                    else:
                        scale = kept[j] * weights[0] if equal_weights else count[j]
                        value = value / (scale if scale != 0 else np.float32(1.0))
                if lam != 1.0:
                    value = value * lam
                out[start + j] = value + base[start + j]

    return delta_histogram, bucket_values, combine


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


def ties(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float], density: list[float],
         keep_ties: bool, lam: float, normalize: bool) -> torch.Tensor:
    """θ_b + λ · TIES(τ_i) with magnitude trim (keep_ties) and sign consensus; bit for bit the
    torch kernel's result. Overwrites ``tensors`` (the result lives in the first one's buffer)."""
    from mergelab.methods.sparsify import SMALLEST_SUBNORMAL

    delta_histogram, bucket_values, combine = _kernels()
    base_flat = base.reshape(-1).numpy()
    deltas = [t.reshape(-1).numpy() for t in tensors]
    thresholds = np.zeros(len(deltas), dtype=np.float32)
    for index, delta in enumerate(deltas):
        counts = delta_histogram(delta, base_flat)
        n, k = delta.size, int(density[index] * delta.size)
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
            values = bucket_values(delta, bucket, int(counts[bucket]))
            needed = k - above
            kth = float(np.partition(values, values.size - needed)[values.size - needed])
            thresholds[index] = max(kth, SMALLEST_SUBNORMAL)
    weights = np.asarray(weight, dtype=np.float32)
    equal = len(set(weight)) == 1 and len(weight) < 256
    combine(numba_list(deltas), thresholds, weights, np.float32(lam), normalize, equal, base_flat, deltas[0])
    return tensors[0]


def numba_list(arrays):
    from numba.typed import List

    typed = List()
    for array in arrays:
        typed.append(array)
    return typed
