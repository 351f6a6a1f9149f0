"""SCE's compiled loops (variance, exact top-k selection, erase: ``methods/_sce_kernels.py``)
against the torch kernel they replace, kept here as the reference, bit for bit: on random
tensors, task vectors with many variances tied at the selection threshold, bfloat16-like
repeated values, zeros, -0.0 in the base, odd sizes, 1 to 5 experts and tiny task vectors."""

from __future__ import annotations

import importlib

import pytest
import torch

from mergelab.methods import METHODS, compiled_topk
from mergelab.methods.sparsify import top_k_mask

sce_module = importlib.import_module("mergelab.methods.sce")  # the package re-exports the function as `sce`


def reference_sce(experts, base, select_topk, keep_ties):
    """The torch kernel SCE had before the compiled loops, over whole tensors (its blocks change
    nothing entry by entry), nothing in place."""
    n = len(experts)
    deltas = [expert - base for expert in experts]
    if select_topk < 1.0:
        mean = torch.zeros_like(base)
        for delta in deltas:
            mean = mean.add(delta, alpha=1.0 / n)
        spread = torch.zeros_like(base)
        for delta in deltas:
            spread = spread.add((delta - mean).square(), alpha=1.0 / n)
        spread = spread.reshape(-1)
        selected = top_k_mask(spread, int(int(torch.count_nonzero(spread)) * select_topk), keep_ties)
        deltas = [delta * selected.reshape(base.shape) for delta in deltas]
    mean_squares = [float(torch.linalg.vector_norm(delta)) ** 2 / delta.numel() for delta in deltas]
    total = sum(mean_squares)
    weights = [1.0 / n] * n if abs(total) < 1e-6 else [m / total for m in mean_squares]
    elected = torch.zeros_like(base)
    for delta in deltas:
        elected = elected.add(delta)
    positive = elected >= 0
    merged, agreeing_weight = None, torch.zeros_like(base)
    for delta, weight in zip(deltas, weights):
        agrees = ((delta > 0) == positive) & (delta != 0)
        masked = delta * agrees
        merged = masked * weight if merged is None else merged.add(masked, alpha=weight)
        agreeing_weight = agreeing_weight.add(agrees, alpha=weight)
    return merged.div(agreeing_weight.clamp(min=1e-6)).add(base)


def random_case(seed: int, kind: str):
    generator = torch.Generator().manual_seed(seed)
    shape = [(4099,), (61, 67), (5, 13, 17), (1 << 12,)][seed % 4]  # odd sizes: partial blocks and vector tails
    base = torch.randn(shape, generator=generator)
    base.view(-1)[:3] = -0.0
    experts = []
    for _ in range(1 + seed % 5):
        if kind == "tied":  # small integers: many variances equal, many exactly at the threshold
            delta = torch.randint(-3, 4, shape, generator=generator).float() / 8
        elif kind == "bf16":  # experts stored in bfloat16: few distinct values, repeated task vectors
            delta = (base + torch.randn(shape, generator=generator) * 0.02).bfloat16().float() - base
        elif kind == "tiny":  # mean squares summing to under 1e-6: uniform weights
            delta = torch.randn(shape, generator=generator) * 1e-5
        else:
            delta = torch.randn(shape, generator=generator) * 0.01
        delta.view(-1)[5:40] = 0.0  # positions no expert changes: zero variance, never selected
        experts.append(base + delta)
    if kind == "bf16":
        experts = [expert.bfloat16().float() for expert in experts]
    return experts, base


@pytest.fixture
def compiled(monkeypatch):
    if compiled_topk.kernels() is None:
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    if torch.backends.cpu.get_cpu_capability() not in sce_module.FUSED_MULTIPLY_ADD:
        pytest.skip("torch does not fuse its multiply-adds on this CPU: the torch kernel runs")
    monkeypatch.setattr(compiled_topk, "MIN_NUMEL", 0)


def run_sce(experts, base, **params):
    return METHODS["sce"]([e.clone() for e in experts], base.clone(), **params)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", ["distinct", "tied", "bf16", "tiny"])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_compiled_sce_equals_the_torch_kernel_bit_for_bit(seed, kind, keep_ties, compiled):
    experts, base = random_case(seed, kind)
    assert sce_module._compiled_applies(experts, base)
    for select_topk in (0.0, 0.1, 0.5, 0.999, 1.0):
        expected = reference_sce(experts, base, select_topk, keep_ties)
        out = run_sce(experts, base, select_topk=select_topk, keep_ties=keep_ties)
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), (select_topk, seed, kind)


def test_the_torch_kernel_is_the_reference_too(monkeypatch):
    # Where the loops do not apply (no numba, small or non-float32 tensors), the torch kernel runs.
    monkeypatch.setattr(compiled_topk, "MIN_NUMEL", 1 << 62)
    for seed, kind in [(0, "distinct"), (3, "tied"), (6, "bf16")]:
        experts, base = random_case(seed, kind)
        assert not sce_module._compiled_applies(experts, base)
        for keep_ties in (True, False):
            out = run_sce(experts, base, select_topk=0.3, keep_ties=keep_ties)
            assert torch.equal(out, reference_sce(experts, base, 0.3, keep_ties))


def test_exact_count_keeps_the_first_tied_positions_in_storage_order(compiled):
    # Two experts, τ = ±d: the variance is d², tied at 1 everywhere but one position (4). Of the
    # 9 non-zero variances, select_topk 0.5 keeps int(4.5) = 4: the largest and the first 3 tied.
    base = torch.zeros(10)
    first = torch.tensor([1.0, -1, 1, -1, 2, 1, -1, 1, 0, 1])
    experts = [first, -first]
    keep_count = run_sce(experts, base, select_topk=0.5, keep_ties=False)
    keep_all = run_sce(experts, base, select_topk=0.5, keep_ties=True)
    # γ is + everywhere (the sum is 0); the agreeing τ is the positive one, with weight ½ of ½
    assert torch.equal(keep_count, torch.tensor([1.0, 1, 1, 0, 2, 0, 0, 0, 0, 0]))
    assert torch.equal(keep_all, torch.tensor([1.0, 1, 1, 1, 2, 1, 1, 1, 0, 1]))
    assert torch.equal(keep_count, reference_sce(experts, base, 0.5, False))
