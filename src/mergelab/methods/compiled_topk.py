"""Exact top-k masks as compiled loops (numba, optional: ``pip install 'mergelab[fast]'``):
the same sets as ``sparsify.top_k_mask``, in a few passes over the tensor instead of a dozen.

A top-k set of |x| is described by (threshold, keep_ties, room): |x| >= threshold with
``keep_ties``, else |x| > threshold plus the first ``room`` entries equal to it in storage
order. ``selection`` finds it as ``sparsify.magnitude_threshold`` does: the histogram of the
top 16 bits of |x| gives the bucket of the k-th largest value, whose exact value comes from
that bucket's entries alone. Used by SCE (``sce.py``) and Model Breadcrumbs (``outlier_trim_``);
DELLA's ranks within a row come from a radix sort (``della_trim_``).
"""

from __future__ import annotations

import numpy as np
import torch

from mergelab.methods.fused import MIN_NUMEL, compiled


def kernels():
    """The compiled loops (``mergelab.methods._sce_kernels``), or None without numba."""
    return compiled("_sce_kernels")


def applies(tensor: torch.Tensor) -> bool:
    """Whether the compiled loops take ``tensor``: float32, on the CPU, contiguous, large enough, numba there."""
    return (tensor.numel() >= MIN_NUMEL and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            and tensor.is_contiguous() and kernels() is not None)


def selection(values: np.ndarray, counts: np.ndarray, k: int, keep_ties: bool) -> tuple[np.float32, bool, int]:
    """(threshold, keep_ties, room) of the top-k set of |values| that ``sparsify.top_k_mask``
    keeps; ``counts`` is the histogram of the top 16 bits of |values|."""
    if k >= values.size:
        return np.float32(0.0), False, 0  # every non-zero
    if k <= 0:
        return np.float32(np.inf), False, 0  # nothing
    from_top = np.cumsum(counts[::-1])
    rank = int(np.searchsorted(from_top, k))
    bucket = (1 << 15) - 1 - rank
    above = int(from_top[rank - 1]) if rank > 0 else 0
    candidates, nans = kernels().bucket_values(values, bucket, int(counts[bucket]))
    needed = k - above  # how many of the bucket's entries are in the top k
    threshold = np.partition(candidates, candidates.size - needed)[candidates.size - needed]
    if threshold == 0:
        return np.float32(0.0), False, 0
    if keep_ties:
        return threshold, True, 0
    greater = above - nans + int(np.count_nonzero(candidates > threshold))  # NaN is never > the threshold
    return threshold, False, k - greater


def outlier_trim_(delta: torch.Tensor, density: float, gamma: float, keep_ties: bool) -> bool:
    """``delta.mul_(sparsify.outlier_mask(delta, density, gamma, keep_ties))`` bit for bit, in
    three passes (histogram, threshold buckets, mask); False, and ``delta`` untouched, where the
    compiled loops do not apply (then the caller runs the torch kernel)."""
    if density >= 1.0 or not applies(delta):
        return False
    flat = delta.reshape(-1).numpy()  # a view: the mask is applied in place
    n = flat.size
    kept = int(density * n)
    top = min(int(gamma * n), n - kept)
    counts = kernels().magnitude_histogram(flat)
    keep_set = selection(flat, counts, top + kept, keep_ties)
    drop_set = selection(flat, counts, top, keep_ties) if top > 0 else (np.float32(np.inf), False, 0)
    kernels().band_trim(flat, keep_set, drop_set)
    return True


def della_trim_(rows: torch.Tensor, draws: torch.Tensor, ramp: torch.Tensor, rescale: bool) -> bool:
    """``sparsify.della_``'s masking of ``rows`` (rows, n) by rank, bit for bit, in one compiled
    pass (a radix sort per row instead of numpy's argsort); False, and ``rows`` untouched, where
    the compiled loops do not apply."""
    if not (applies(rows) and draws.is_contiguous() and draws.dtype == torch.float32 and draws.device.type == "cpu"):
        return False
    kernels().della_trim(rows.numpy(), draws.numpy(), ramp.numpy(), rescale)
    return True
