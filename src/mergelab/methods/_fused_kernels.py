"""The compiled loops of ``mergelab.methods.fused`` (imported only when TIES runs on a large
tensor, so that ``import mergelab`` never pays for numba). Module-level functions, so that
numba's on-disk cache (``cache=True``) finds them again in the next process."""

import numba
import numpy as np


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
