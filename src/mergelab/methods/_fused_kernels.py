"""The compiled loops of ``mergelab.methods.fused`` (imported only when TIES runs on a large
tensor, so that ``import mergelab`` never pays for numba). Module-level functions, so that
numba's on-disk cache (``cache=True``) finds them again in the next process.

``error_model="numpy"``: a float division never raises (Python's ZeroDivisionError check is a
branch per entry that keeps LLVM from vectorizing the loop); every divisor here is non-zero, so
the results are the same, 3-4x sooner."""

import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def delta_histogram(expert, base, low, high, candidates):  # pass 1
    """τ = expert − base in place; the histogram of the top 16 bits of |τ|; and |τ| of every
    entry whose bucket is in [low, high] copied into ``candidates`` (while they fit), so that
    the threshold bucket needs no second pass when it falls in that window. Returns (counts,
    how many candidates, whether they all fit)."""
    counts = np.zeros(1 << 15, dtype=np.int64)
    bits = expert.view(np.uint32)
    capacity, found, width = candidates.size, 0, high - low
    for i in range(expert.size):
        expert[i] = expert[i] - base[i]
        bucket = (bits[i] >> 16) & 0x7FFF
        counts[bucket] += 1
        if np.uint32(bucket - low) <= np.uint32(width):
            if found < capacity:
                candidates[found] = abs(expert[i])
            found += 1
    return counts, min(found, capacity), found <= capacity


@numba.njit(**JIT)
def bucket_values(delta, bucket, count):  # pass 2, only when pass 1's window missed the bucket
    values = np.empty(count, dtype=np.float32)
    bits = delta.view(np.uint32)
    found = 0
    for i in range(delta.size):
        if ((bits[i] >> 16) & 0x7FFF) == bucket and found < count:  # (count is exact: never full early)
            values[found] = abs(delta[i])
            found += 1
    return values


@numba.njit(**JIT)
def sample_magnitudes(expert, base, step, out):  # the threshold guess's sample
    """|expert − base| at every ``step``-th entry, into ``out`` (one loop: numpy's strided slices,
    difference and abs took several times longer)."""
    for j in range(out.size):
        out[j] = abs(expert[j * step] - base[j * step])


@numba.njit(**JIT)
def kth_in_bucket(values, bucket, needed):
    """The bits of the ``needed``-th largest of those ``values`` (non-negative floats) whose top
    16 bits are ``bucket``, by a histogram of their low 16 bits: one loop over ``values`` (the
    candidates of a window of buckets, or one bucket's entries)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    bits = values.view(np.uint32)
    top = np.uint32(bucket)
    for i in range(values.size):
        if (bits[i] >> np.uint32(16)) == top:
            counts[bits[i] & np.uint32(0xFFFF)] += 1
    low, seen = (1 << 16) - 1, 0
    while low > 0:
        seen += counts[low]
        if seen >= needed:
            break
        low -= 1
    return np.uint32((bucket << 16) | low)


@numba.njit(**JIT, inline="always")
def trimmed(value, threshold, weight):
    # (x·1.0 is x exactly, so multiplying by a weight of 1 is what skipping it gives)
    return value * (np.float32(1.0) if abs(value) >= threshold else np.float32(0.0)) * weight


@numba.njit(**JIT, inline="always")
def agreeing(value, threshold, weight, sign):  # clamp(τ̂·γ, min=0), NaN kept
    flipped = trimmed(value, threshold, weight) * sign
    return flipped if (flipped > 0) | (flipped != flipped) else np.float32(0.0)


@numba.njit(**JIT)
def combine(deltas, thresholds, weights, lam, normalize, equal_weights, base, out):  # pass 3
    """Entry by entry, every task vector at once (the expert loop is unrolled: ``deltas`` is a
    tuple of fixed length): trim, weight, the sign sum in model order, γ, the agreeing sum and
    count, the disjoint mean, λ and the base. One read of each input, one write. ``out`` may be
    one of the inputs: each block is computed into a small buffer first and copied, because a
    loop whose output overlaps its inputs is not vectorized (3x slower)."""
    experts, size, block = len(deltas), base.size, 4096
    one, zero = np.float32(1.0), np.float32(0.0)
    first_weight = weights[0]
    result = np.empty(block, dtype=np.float32)
    for start in range(0, size, block):
        width = min(block, size - start)
        for j in range(width):
            i = start + j
            total = trimmed(deltas[0][i], thresholds[0], weights[0])  # the sign sum, in model order
            for e in range(1, experts):
                total = total + trimmed(deltas[e][i], thresholds[e], weights[e])
            sign = one if total >= 0 else -one  # γ: +1 where the sum is >= 0, -1 elsewhere (NaN too, as ge_)
            merged = kept = count = zero  # the agreeing sum, how many agree (exact as a float), their weight
            for e in range(experts):
                flipped = agreeing(deltas[e][i], thresholds[e], weights[e], sign)
                hit = one if flipped > 0 else zero
                merged = flipped if e == 0 else merged + flipped
                kept = hit if e == 0 else kept + hit
                if not equal_weights:  # torch.sign(flipped)·w summed: NaN where flipped is NaN
                    agreed = flipped if flipped != flipped else hit
                    count = agreed * weights[e] if e == 0 else count + weights[e] * agreed
            value = merged * sign + zero
            if normalize:
                if equal_weights and first_weight > 0:
                    value = value / ((kept if kept > one else one) * first_weight)  # max(kept, 1): never NaN
                else:
                    scale = kept * first_weight if equal_weights else count
                    value = value / (scale if scale != 0 else one)
            if lam != 1.0:
                value = value * lam
            result[j] = value + base[i]
        out[start:start + width] = result[:width]


@numba.njit(**JIT)
def combine_equal_mean(deltas, thresholds, weight, lam, base, out):  # pass 3, TIES's usual case
    """``combine`` for equal weights ``weight`` > 0 with the disjoint mean (normalize): the same
    operations in the same order, without the branches the general loop carries for unequal
    weights and the disjoint sum (about a fifth sooner)."""
    experts, size, block = len(deltas), base.size, 4096
    one, zero = np.float32(1.0), np.float32(0.0)
    result = np.empty(block, dtype=np.float32)
    for start in range(0, size, block):
        width = min(block, size - start)
        for j in range(width):
            i = start + j
            total = trimmed(deltas[0][i], thresholds[0], weight)  # the sign sum, in model order
            for e in range(1, experts):
                total = total + trimmed(deltas[e][i], thresholds[e], weight)
            sign = one if total >= 0 else -one
            merged = agreeing(deltas[0][i], thresholds[0], weight, sign)
            kept = one if merged > 0 else zero
            for e in range(1, experts):
                flipped = agreeing(deltas[e][i], thresholds[e], weight, sign)
                merged = merged + flipped
                kept = kept + (one if flipped > 0 else zero)
            result[j] = (merged * sign + zero) / ((kept if kept > one else one) * weight)  # max(kept, 1)
        if lam != 1.0:
            for j in range(width):
                result[j] = result[j] * lam
        for j in range(width):
            out[start + j] = result[j] + base[start + j]
