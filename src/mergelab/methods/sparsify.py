"""Sparsifying a task vector: keep its largest entries (TIES) or a random subset (DARE)."""

from __future__ import annotations

import enum
import hashlib

import torch


class Sparsify(enum.Enum):
    """How a task vector is thinned before it is combined."""

    MAGNITUDE = "magnitude"  # TIES trim: keep the top-k entries by |τ|
    RANDOM = "random"  # DARE: keep each entry with probability density


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
    # The top 16 bits of each (little-endian) float32, as a strided int16 view: no copy. The
    # sign bit is 0, so they read as 0..32767 and order like the values.
    high = magnitudes.view(torch.int16)[1::2]  # (n,)
    counts = torch.bincount(high, minlength=1 << 15)  # (32768,)
    from_top = counts.flip(0).cumsum(0)
    rank = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)).item())
    bucket = (1 << 15) - 1 - rank
    above = int(from_top[rank - 1].item()) if rank > 0 else 0
    candidates = magnitudes[high == bucket]
    needed = k - above  # how many of the bucket's entries are in the top k
    return float(torch.kthvalue(candidates, candidates.numel() - needed + 1).values.item())


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the top ``density`` fraction of ``delta`` by absolute value.

    Entries tied with the threshold are all kept, so the result never depends on the
    order in which equal values happen to be stored.
    """
    flat = delta.reshape(-1)
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    magnitudes = flat.abs().float()
    k = int(round(density * flat.numel()))
    threshold = magnitude_threshold(magnitudes, k)
    return (magnitudes >= threshold).reshape(delta.shape) if threshold > 0 else (magnitudes > 0).reshape(delta.shape)


def mask_seed(seed: int, model_index: int, key: str) -> int:
    """A 63-bit seed that depends only on (seed, model index, tensor name)."""
    digest = hashlib.blake2b(f"{seed}\x00{model_index}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_mask(shape: torch.Size, density: float, seed: int, model_index: int, key: str) -> torch.Tensor:
    """Bernoulli(density) keep-mask, drawn on the CPU so every device gets the same one."""
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, model_index, key))
    return torch.rand(shape, generator=generator) < density
