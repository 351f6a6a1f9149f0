"""SCE (Wan et al. 2024, FuseChat, arXiv:2408.07990 §3.3): Select, Calculate, Erase.

Over the task vectors τ_i = θ_i − θ_b of one tensor:
1. Select: keep only the positions whose variance across the τ_i is among the top
   ``select_topk`` fraction (of the positions with non-zero variance), zeroing the rest in every τ_i;
2. Calculate: one weight per task vector, η_i = mean(τ_i²) / Σ_j mean(τ_j²) (uniform when the
   mean squares sum to under 1e-6, as mergekit does);
3. Erase: TIES sign election on Σ_i τ_i; per entry, combine only the τ_i that agree with it.

θ = θ_b + Σ_i η_i m_i τ_i / Σ_i η_i m_i, m_i the agreement mask (the denominator is clamped
at 1e-6 where no weight agrees).

On large float32 CPU tensors, with numba installed (``pip install 'mergelab[fast]'``), the same
arithmetic runs as compiled loops (``_sce_kernels``) in four passes over memory instead of some
thirty torch passes: τ and the variance with its histogram; the variance's threshold bucket (an
exact top-k, as ``sparsify.magnitude_threshold``); the selection; the erase. The mean squares
stay torch's own norm. Bit for bit the torch kernel's result (``tests/test_sce_kernel.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from mergelab.methods import compiled_topk
from mergelab.methods.sparsify import top_k_mask

UNIFORM_BELOW = 1e-6  # mean squares summing to less than this give every task vector the same weight


def sce(tensors: list[torch.Tensor], base: torch.Tensor, *, select_topk: float, keep_ties: bool) -> torch.Tensor:
    """SCE of the experts' task vectors over ``base``; holds the N task vectors plus one tensor (the
    variance) and blocks of 1M entries."""
    if _compiled_applies(tensors, base):
        return _sce_compiled(tensors, base, select_topk, keep_ties)
    n = len(tensors)
    deltas = [tensor.sub_(base) for tensor in tensors]  # τ_i, in the experts' own buffers
    if select_topk < 1.0:
        spread = _variance(deltas).reshape(-1)  # (numel,) float32
        k = int(int(torch.count_nonzero(spread)) * select_topk)
        selected = top_k_mask(spread, k, keep_ties).reshape(base.shape)
        del spread
        for delta in deltas:
            delta.mul_(selected)
        del selected
    mean_squares = [float(torch.linalg.vector_norm(delta)) ** 2 / delta.numel() for delta in deltas]
    total = sum(mean_squares)
    weights = [1.0 / n] * n if abs(total) < UNIFORM_BELOW else [m / total for m in mean_squares]
    # Erase, block by block (each block's passes stay in cache; the result goes into the first
    # task vector's buffer): the same per-entry arithmetic as over whole tensors.
    flat = [delta.reshape(-1) for delta in deltas]
    flat_base = base.reshape(-1)
    for start in range(0, flat_base.numel(), CHUNK):
        block = slice(start, start + CHUNK)
        elected = torch.zeros_like(flat_base[block])
        for delta in flat:
            elected.add_(delta[block])
        positive = elected >= 0  # γ = +1 here (ties go to +), bool
        merged = None  # the first task vector's block, once masked and weighted
        agreeing_weight = torch.zeros_like(elected)
        for delta, weight in zip(flat, weights):
            part = delta[block]
            agrees = (part > 0) == positive
            agrees &= part != 0  # zeros never agree
            if merged is None:
                merged = part.mul_(agrees).mul_(weight)
            else:
                merged.add_(part.mul_(agrees), alpha=weight)
            agreeing_weight.add_(agrees, alpha=weight)
        merged.div_(agreeing_weight.clamp_(min=UNIFORM_BELOW)).add_(flat_base[block])
    result = flat[0].reshape(base.shape)  # where the blocks were written (a view of τ_1's buffer)
    deltas.clear()
    tensors.clear()
    return result

CHUNK = 1 << 20  # entries per block of the variance pass: a few MB of temporaries instead of two whole tensors


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across the task vectors per entry (as mergekit), computed block by
    block so that only the result is a whole tensor: the same two-pass arithmetic, entry by
    entry, as mean = Σ τ_i / n, var = Σ (τ_i − mean)² / n over whole tensors."""
    n = len(deltas)
    flat = [delta.reshape(-1) for delta in deltas]
    variance = torch.empty_like(flat[0])
    for start in range(0, variance.numel(), CHUNK):
        block = [f[start:start + CHUNK] for f in flat]
        mean = torch.zeros_like(block[0])
        for part in block:
            mean.add_(part, alpha=1.0 / n)
        out = variance[start:start + CHUNK].zero_()
        for part in block:
            out.add_((part - mean).square_(), alpha=1.0 / n)
    return variance.reshape(deltas[0].shape).float()


FUSED_MULTIPLY_ADD = ("AVX2", "AVX512")  # torch's capabilities whose add_(x, alpha=w) rounds once, as the loops do


def _compiled_applies(tensors: list[torch.Tensor], base: torch.Tensor) -> bool:
    """Whether the compiled loops give the torch kernel's bits: float32 CPU contiguous tensors of
    one shape, large enough, on a CPU where torch fuses its multiply-adds, with numba there."""
    if not tensors or not compiled_topk.applies(base):
        return False
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.shape == base.shape
               for t in tensors):
        return False
    return torch.backends.cpu.get_cpu_capability() in FUSED_MULTIPLY_ADD


def _sce_compiled(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float,
                  keep_ties: bool) -> torch.Tensor:
    """``sce`` in compiled passes over the experts' own buffers; holds one extra tensor (the variance)."""
    kernels = compiled_topk.kernels()
    n = len(tensors)
    base_flat = base.reshape(-1).numpy()
    deltas = tuple(t.reshape(-1).numpy() for t in tensors)  # views: the loops write τ_i into the experts
    if select_topk < 1.0:
        variance = np.empty_like(base_flat)
        counts, nonzero = kernels.delta_variance(deltas, base_flat, np.float32(1.0 / n), variance)
        selected = compiled_topk.selection(variance, counts, int(nonzero * select_topk), keep_ties)
        kernels.select(deltas, variance, *selected)
        del variance
    else:
        for tensor in tensors:
            tensor.sub_(base)
    mean_squares = [float(torch.linalg.vector_norm(t)) ** 2 / t.numel() for t in tensors]  # torch's own sums
    total = sum(mean_squares)
    weights = [1.0 / n] * n if abs(total) < UNIFORM_BELOW else [m / total for m in mean_squares]
    kernels.erase(deltas, np.asarray(weights, dtype=np.float32), np.float32(UNIFORM_BELOW), base_flat, deltas[0])
    result = tensors[0]
    tensors.clear()
    return result
