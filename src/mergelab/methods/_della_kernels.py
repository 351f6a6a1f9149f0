"""The compiled loops of DELLA (driven by ``sparsify.della_merge``), imported only when DELLA runs
on a large float32 CPU tensor, so that ``import mergelab`` never pays for numba. Module-level
functions, so that numba's on-disk cache finds them again in the next process.

Per task vector, one pass over each row: τ = θ_i − θ_b, the row's draws, its ranks by |τ| and the
keep/rescale. The ranks (a stable argsort of |τ|'s bits) come from one counting pass over the
top bits of each key, at about one bucket per entry, and an insertion pass that orders each
bucket's few entries: with bfloat16 checkpoints most buckets hold one value.

The random draws are torch's own: ``torch.rand`` on a CPU generator is the 32-bit Mersenne
Twister (MT19937) seeded by ``manual_seed``, one output per entry in storage order, its low 24
bits times 2⁻²⁴. ``mt_seed`` and ``draw_row`` reproduce that stream number for number (checked
against ``torch.rand`` once per process by ``sparsify``, and in ``tests/test_della_kernel.py``),
so the masks are DARE's, the same for any thread count, without a 4-byte draw per entry in
memory. Every float operation is the torch kernel's, in its order, without fast-math.
"""

import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")  # (a float division never raises: see _fused_kernels)

STATE = 624  # MT19937's state, in 32-bit words
SHIFT = 397
UPPER, LOWER, MATRIX = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)


@numba.njit(**JIT)
def mt_seed(seed):
    """MT19937's state from a 64-bit seed as torch's ``manual_seed`` sets it (its low 32 bits
    through the reference ``init_genrand``), and the position of the next output (624: the
    state is twisted before the first one)."""
    state = np.empty(STATE + 1, dtype=np.uint32)  # the last word holds the position
    word = np.uint32(seed & 0xFFFFFFFF)
    state[0] = word
    for i in range(1, STATE):
        word = np.uint32(np.uint32(1812433253) * (word ^ (word >> np.uint32(30))) + np.uint32(i))
        state[i] = word
    state[STATE] = STATE
    return state


@numba.njit(**JIT, inline="always")
def _twisted(word, following, far):
    mixed = (word & UPPER) | (following & LOWER)
    return far ^ (mixed >> np.uint32(1)) ^ (MATRIX * (following & np.uint32(1)))


@numba.njit(**JIT)
def _twist(state):
    for i in range(STATE - SHIFT):
        state[i] = _twisted(state[i], state[i + 1], state[i + SHIFT])
    for i in range(STATE - SHIFT, STATE - 1):
        state[i] = _twisted(state[i], state[i + 1], state[i + SHIFT - STATE])
    state[STATE - 1] = _twisted(state[STATE - 1], state[0], state[SHIFT - 1])


@numba.njit(**JIT)
def draw_row(state, out):
    """The next ``out.size`` uniform float32 draws of the stream in ``state``, as ``torch.rand``
    gives them: (tempered output & 0xFFFFFF) · 2⁻²⁴."""
    scale = np.float32(1.0 / (1 << 24))
    done, size = 0, out.size
    while done < size:
        position = state[STATE]
        if position == STATE:
            _twist(state)
            position = 0
        take = min(size - done, STATE - position)
        words, block = state[position:position + take], out[done:done + take]
        for j in range(take):  # tempering, vectorized
            y = words[j]
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            block[j] = np.float32(y & np.uint32(0xFFFFFF)) * scale
        state[STATE] = position + take
        done += take


@numba.njit(**JIT)
def _rank_row(keys, top, packed, buckets, counts, shift):
    """Sort (key << 32 | column) by key, ties by column (a stable argsort of ``keys``; ``top``
    is their maximum) into ``packed``. One counting pass over the top bits of each key (the
    ``counts.size`` = 2^(27 − shift) buckets below ``top``'s: 16 octaves of a float's range at
    2^(23 − shift) buckets an octave; smaller keys share the lowest bucket), then an insertion
    pass that orders each bucket's entries by their whole key; a row that needs many moves
    there is sorted outright (the same result: the packed values are distinct)."""
    width, size = keys.size, counts.size
    highest = top >> shift
    low = highest - np.uint32(size - 1) if highest > np.uint32(size - 1) else np.uint32(0)
    counts[:] = 0
    for j in range(width):
        high = keys[j] >> shift
        bucket = high - low if high > low else np.uint32(0)
        buckets[j] = bucket
        counts[bucket] += np.uint32(1)
    position = np.uint32(0)
    for bucket in range(size):
        count = counts[bucket]
        counts[bucket] = position
        position += count
    for j in range(width):
        bucket = buckets[j]
        slot = counts[bucket]
        counts[bucket] = slot + np.uint32(1)
        packed[slot] = (np.uint64(keys[j]) << np.uint64(32)) | np.uint64(j)
    moves, budget = 0, 16 * width
    previous = packed[0]
    for i in range(1, width):
        item = packed[i]
        if item >= previous:  # in order: the common case, no store
            previous = item
            continue
        k = i - 1
        while k >= 0 and packed[k] > item:
            packed[k + 1] = packed[k]
            k -= 1
        packed[k + 1] = item
        moves += i - 1 - k
        if moves > budget:  # many keys in one bucket: a comparison sort is cheaper
            packed.sort()
            return


def bucket_bits(width):
    """log2 of ``_rank_row``'s bucket count for rows of ``width`` entries: about one bucket per
    entry, 2^4 to 2^13."""
    return min(13, max(4, (max(width, 1) - 1).bit_length()))


@numba.njit(**JIT, inline="always")
def _keep(value, draw, probability, rescale):
    one, zero = np.float32(1.0), np.float32(0.0)
    kept = value * (one if draw < probability else zero)
    return kept / probability if rescale else kept


@numba.njit(**JIT)
def sparsify_rows(expert, base, state, ramp, ranked, rescale, bits_of_buckets):
    """One task vector of DELLA, in place, row by row: τ = expert − base; the row's draws from
    ``state``; the entry of rank r by |τ| in its row (ties in storage order) kept where its draw
    is below ramp[r] (τ · 1.0, else τ · 0.0), then divided by ramp[r] with ``rescale``.
    ``ranked``: whether the ramp rises (with ε = 0 every entry has the same probability and
    no ranks are needed). ``expert`` and ``base`` are (rows, width); ``bits_of_buckets``:
    ``bucket_bits(width)``."""
    rows, width = expert.shape
    draws = np.empty(width, dtype=np.float32)
    keys = np.empty(width, dtype=np.uint32)
    buckets = np.empty(width, dtype=np.uint32)
    packed = np.empty(width, dtype=np.uint64)
    counts = np.empty(1 << bits_of_buckets, dtype=np.uint32)
    shift = np.uint32(27 - bits_of_buckets)
    for r in range(rows):
        row, base_row = expert[r], base[r]
        bits = row.view(np.uint32)
        top = np.uint32(0)
        for j in range(width):
            row[j] = row[j] - base_row[j]
            key = bits[j] & np.uint32(0x7FFFFFFF)  # |τ|'s bits: non-negative floats order like them
            keys[j] = key
            top = max(top, key)
        draw_row(state, draws)
        if not ranked:
            for j in range(width):
                row[j] = _keep(row[j], draws[j], ramp[0], rescale)
            continue
        _rank_row(keys, top, packed, buckets, counts, shift)
        for rank in range(width):
            column = packed[rank] & np.uint64(0xFFFFFFFF)
            row[column] = _keep(row[column], draws[column], ramp[rank], rescale)


@numba.njit(**JIT)
def difference_rows(expert, base):
    """τ = expert − base in place (an expert whose density is 1 is not thinned)."""
    flat, base_flat = expert.reshape(-1), base.reshape(-1)
    for i in range(flat.size):
        flat[i] = flat[i] - base_flat[i]


@numba.njit(**JIT)
def weighted_sum(deltas, weights, total, normalize, lam, base, out):
    """Task arithmetic over thinned τ_i, as the torch kernel: Σ_i τ_i·w_i in model order, divided
    by ``total`` with ``normalize``, times λ (when not 1), plus the base. ``out`` may be one of
    ``deltas`` (each block is read before it is written)."""
    size, block = base.size, 4096
    result = np.empty(block, dtype=np.float32)
    for start in range(0, size, block):
        width = min(block, size - start)
        first = deltas[0][start:start + width]
        for j in range(width):
            result[j] = first[j] * weights[0]
        for e in range(1, len(deltas)):
            delta, weight = deltas[e][start:start + width], weights[e]
            for j in range(width):
                result[j] = result[j] + delta[j] * weight
        if normalize:
            for j in range(width):
                result[j] = result[j] / total
        if lam != 1.0:
            for j in range(width):
                result[j] = result[j] * lam
        block_base, block_out = base[start:start + width], out[start:start + width]
        for j in range(width):
            block_out[j] = result[j] + block_base[j]
