"""The compiled loops of SCE (``mergelab.methods.sce``) and of the exact top-k masks behind it and
Model Breadcrumbs (``mergelab.methods.compiled_topk``), imported only when they run on a large
float32 tensor, so that ``import mergelab`` never pays for numba. Module-level functions, so
that numba's on-disk cache (``cache=True``) finds them again in the next process.

Each loop does the torch kernel's float operations, entry by entry, in its order. Where torch
computes ``a.add_(b, alpha=w)`` it rounds once (``a + w·b`` as one fused multiply-add, in its
vector loop and in the scalar tail alike, on CPUs whose capability is AVX2 or AVX-512), so
these loops call ``fma`` there and nowhere else; numba's default (no fast-math) neither fuses
nor reorders anything else.
"""

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic

BLOCK = 4096  # entries per block: each block's per-expert passes stay in the L1/L2 cache


@intrinsic
def fma(typingctx, a, b, c):
    """a·b + c rounded once (float32)."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return signature, codegen


@numba.njit(cache=True, nogil=True)
def delta_variance(experts, base, share, variance):
    """τ_i = θ_i − θ_b in place, and per entry the population variance of the τ_i into
    ``variance``: mean = Σ_i fma(τ_i, 1/n, ·) from 0, then Σ_i fma((τ_i − mean)², 1/n, ·) from 0.
    Returns the histogram of the variance's top 16 bits (its sign bit masked off) and how many
    variances are non-zero."""
    counts = np.zeros(1 << 15, dtype=np.int64)
    mean = np.empty(BLOCK, dtype=np.float32)
    bits = variance.view(np.uint32)
    zero = np.float32(0.0)
    nonzero = 0
    for start in range(0, base.size, BLOCK):  # blocks as slices: indices from 0 let LLVM vectorize
        width = min(BLOCK, base.size - start)
        block_base, block_mean = base[start:start + width], mean[:width]
        block_variance, block_bits = variance[start:start + width], bits[start:start + width]
        for j in range(width):
            block_mean[j] = zero
            block_variance[j] = zero
        for e in range(len(experts)):
            expert = experts[e][start:start + width]
            for j in range(width):
                expert[j] = expert[j] - block_base[j]
            for j in range(width):
                block_mean[j] = fma(expert[j], share, block_mean[j])
        for e in range(len(experts)):
            expert = experts[e][start:start + width]
            for j in range(width):
                gap = expert[j] - block_mean[j]
                block_variance[j] = fma(gap * gap, share, block_variance[j])
        for j in range(width):
            counts[(block_bits[j] >> 16) & 0x7FFF] += 1
            nonzero += block_variance[j] != 0
    return counts, nonzero


@numba.njit(cache=True, nogil=True)
def magnitude_histogram(values):
    """The histogram of the top 16 bits of |values| (non-negative floats order like their bits)."""
    counts = np.zeros(1 << 15, dtype=np.int64)
    bits = values.view(np.uint32)
    for i in range(values.size):
        counts[(bits[i] >> 16) & 0x7FFF] += 1
    return counts


@numba.njit(cache=True, nogil=True)
def bucket_values(values, bucket, count):
    """The ``count`` entries of |values| whose top 16 bits are ``bucket``, and how many NaNs lie
    outside that bucket."""
    found_values = np.empty(count, dtype=np.float32)
    bits = values.view(np.uint32)
    found = 0
    nans = 0
    for i in range(values.size):
        if ((bits[i] >> 16) & 0x7FFF) == bucket:
            if found < count:  # (count is exact: never full early)
                found_values[found] = abs(values[i])
                found += 1
        elif values[i] != values[i]:
            nans += 1
    return found_values, nans


@numba.njit(cache=True, nogil=True, inline="always")
def in_top(value, threshold, keep_ties, room, tied):
    """Whether |value| is in a top-k set given as (threshold, keep_ties, room) (see ``select``),
    and the count of ties at the threshold seen so far, updated."""
    if keep_ties:
        return value >= threshold, tied
    if value > threshold:
        return True, tied
    if value == threshold:
        return tied < room, tied + 1
    return False, tied


@numba.njit(cache=True, nogil=True)
def band_trim(delta, kept, dropped):
    """Model Breadcrumbs' mask, in place: τ · 1.0 where |τ| is in the top set ``kept`` and not in
    the top set ``dropped`` (each a (threshold, keep_ties, room) triple), τ · 0.0 elsewhere."""
    one, zero = np.float32(1.0), np.float32(0.0)
    kept_ties = dropped_ties = 0
    for i in range(delta.size):
        magnitude = abs(delta[i])
        keep, kept_ties = in_top(magnitude, kept[0], kept[1], kept[2], kept_ties)
        drop, dropped_ties = in_top(magnitude, dropped[0], dropped[1], dropped[2], dropped_ties)
        delta[i] = delta[i] * (one if keep and not drop else zero)


@numba.njit(cache=True, nogil=True)
def select(deltas, variance, threshold, keep_ties, room):
    """Zero every τ_i where the variance is not selected, in place (τ_i · 1.0 or τ_i · 0.0, as a
    multiplication by a boolean mask): selected is variance >= threshold with ``keep_ties``,
    else variance > threshold plus the first ``room`` entries equal to it in storage order."""
    keep = np.empty(BLOCK, dtype=np.float32)
    one, zero = np.float32(1.0), np.float32(0.0)
    tied = 0
    for start in range(0, variance.size, BLOCK):
        width = min(BLOCK, variance.size - start)
        block_keep, block_variance = keep[:width], variance[start:start + width]
        if keep_ties:
            for j in range(width):
                block_keep[j] = one if block_variance[j] >= threshold else zero
        else:
            for j in range(width):
                value = block_variance[j]
                if value > threshold:
                    block_keep[j] = one
                elif value == threshold and tied < room:
                    block_keep[j] = one
                    tied += 1
                else:
                    block_keep[j] = zero
        for e in range(len(deltas)):
            delta = deltas[e][start:start + width]
            for j in range(width):
                delta[j] = delta[j] * block_keep[j]


@numba.njit(cache=True, nogil=True)
def erase(deltas, weights, floor, base, out):
    """SCE's erase per entry: γ = + where Σ_i τ_i >= 0; τ_i agrees when it is non-zero and its
    sign is γ's; θ = Σ_i η_i [agrees] τ_i / max(Σ_i η_i [agrees], floor) + θ_b, the sums in
    expert order as the torch kernel (its first term τ_1·[agrees]·η_1, then fused
    multiply-adds). ``out`` may be one of ``deltas`` (each block is read before it is written)."""
    positive = np.empty(BLOCK, dtype=np.bool_)
    elected = np.empty(BLOCK, dtype=np.float32)
    merged = np.empty(BLOCK, dtype=np.float32)
    agreeing = np.empty(BLOCK, dtype=np.float32)
    one, zero = np.float32(1.0), np.float32(0.0)
    for start in range(0, base.size, BLOCK):
        width = min(BLOCK, base.size - start)
        block_positive, block_elected = positive[:width], elected[:width]
        block_merged, block_agreeing = merged[:width], agreeing[:width]
        for j in range(width):
            block_elected[j] = zero
            block_agreeing[j] = zero
        for e in range(len(deltas)):
            delta = deltas[e][start:start + width]
            for j in range(width):
                block_elected[j] = block_elected[j] + delta[j]
        for j in range(width):
            block_positive[j] = block_elected[j] >= 0
        for e in range(len(deltas)):
            delta, weight = deltas[e][start:start + width], weights[e]
            if e == 0:
                for j in range(width):
                    part = delta[j]
                    agrees = one if ((part > 0) == block_positive[j] and part != 0) else zero
                    block_merged[j] = part * agrees * weight
                    block_agreeing[j] = fma(agrees, weight, block_agreeing[j])
            else:
                for j in range(width):
                    part = delta[j]
                    agrees = one if ((part > 0) == block_positive[j] and part != 0) else zero
                    block_merged[j] = fma(part * agrees, weight, block_merged[j])
                    block_agreeing[j] = fma(agrees, weight, block_agreeing[j])
        block_out, block_base = out[start:start + width], base[start:start + width]
        for j in range(width):
            total = block_agreeing[j] if not block_agreeing[j] < floor else floor  # clamp(min=floor), NaN kept
            block_out[j] = block_merged[j] / total + block_base[j]


@numba.njit(cache=True, nogil=True)
def della_trim(rows, draws, ramp, rescale):
    """DELLA's MagPrune, in place, row by row: the entry of rank r by |τ| (ties in storage order)
    is kept where its draw is below ramp[r] (τ · 1.0, else τ · 0.0), then divided by ramp[r] with
    ``rescale``. The ranks come from a stable radix sort of the bits of |τ| (8 bits a pass,
    passes where every key shares the digit skipped): the order of a stable argsort."""
    width = rows.shape[1]
    keys, spare_keys = np.empty(width, dtype=np.uint32), np.empty(width, dtype=np.uint32)
    order, spare_order = np.empty(width, dtype=np.int64), np.empty(width, dtype=np.int64)
    counts = np.empty((4, 256), dtype=np.int64)
    one, zero = np.float32(1.0), np.float32(0.0)
    for r in range(rows.shape[0]):
        row, row_draws = rows[r], draws[r]
        bits = row.view(np.uint32)
        counts[:] = 0
        for j in range(width):
            key = bits[j] & 0x7FFFFFFF  # |τ|'s bits: non-negative floats order like them
            keys[j] = key
            order[j] = j
            for digit in range(4):
                counts[digit, (key >> (8 * digit)) & 0xFF] += 1
        for digit in range(4):
            if counts[digit].max() == width:  # every key has this digit: the pass changes nothing
                continue
            position = 0
            for value in range(256):
                count = counts[digit, value]
                counts[digit, value] = position
                position += count
            for j in range(width):
                value = (keys[j] >> (8 * digit)) & 0xFF
                target = counts[digit, value]
                counts[digit, value] = target + 1
                spare_keys[target] = keys[j]
                spare_order[target] = order[j]
            keys, spare_keys = spare_keys, keys
            order, spare_order = spare_order, order
        for rank in range(width):
            column = order[rank]
            probability = ramp[rank]
            value = row[column] * (one if row_draws[column] < probability else zero)
            row[column] = value / probability if rescale else value
