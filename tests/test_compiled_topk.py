"""The compiled exact top-k sets and DELLA ranks (``methods/compiled_topk.py``) against ``sparsify``'s torch
masks, bit for bit: Model Breadcrumbs' band (drop the top gamma and the bottom, keep density) on
random task vectors, vectors with many |τ| tied at both thresholds, zeros, NaN-free odd sizes."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods import METHODS, compiled_topk
from mergelab.methods.sparsify import Rescale, della_, outlier_mask


@pytest.fixture
def compiled(monkeypatch):
    if compiled_topk.kernels() is None:
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    monkeypatch.setattr(compiled_topk, "MIN_NUMEL", 0)


def task_vector(seed: int, tied: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = [(4099,), (61, 67), (5, 13, 17)][seed % 3]
    if tied:  # small integers: most |τ| equal others, many exactly at a threshold
        delta = torch.randint(-4, 5, shape, generator=generator).float() / 8
    else:
        delta = torch.randn(shape, generator=generator) * 0.01
    delta.view(-1)[5:40] = 0.0
    delta.view(-1)[40:45] = -0.0
    return delta


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("keep_ties", [True, False])
def test_outlier_trim_equals_the_torch_mask_bit_for_bit(seed, tied, keep_ties, compiled):
    delta = task_vector(seed, tied)
    for density, gamma in [(0.2, 0.01), (0.5, 0.0), (0.1, 0.3), (0.7, 0.5), (0.0, 0.2), (0.999, 0.001)]:
        expected = delta * outlier_mask(delta, density, gamma, keep_ties)
        trimmed = delta.clone()
        assert compiled_topk.outlier_trim_(trimmed, density, gamma, keep_ties)
        assert torch.equal(trimmed.view(torch.int32), expected.view(torch.int32)), (density, gamma)


def test_outlier_trim_leaves_what_it_does_not_take(monkeypatch):
    delta = task_vector(0, tied=False)
    monkeypatch.setattr(compiled_topk, "MIN_NUMEL", 0)
    assert not compiled_topk.outlier_trim_(delta, 1.0, 0.01, True)  # density 1: nothing to trim
    assert not compiled_topk.outlier_trim_(delta.double(), 0.2, 0.01, True)  # float64: the torch kernel
    monkeypatch.setattr(compiled_topk, "MIN_NUMEL", 1 << 62)
    assert not compiled_topk.outlier_trim_(delta, 0.2, 0.01, True)  # small: the torch kernel
    assert torch.equal(delta, task_vector(0, tied=False))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_merges_are_the_same_with_either_kernel(method, compiled, monkeypatch):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(67, 61, generator=generator)
    experts = [base + torch.randint(-4, 5, (67, 61), generator=generator).float() / 64 for _ in range(3)]
    params = {"weight": [1.0, 0.5, 2.0], "density": [0.3, 0.2, 0.4], "gamma": [0.01, 0.05, 0.0], "keep_ties": False}
    merged = METHODS[method]([e.clone() for e in experts], base.clone(), **params)
    monkeypatch.setattr(compiled_topk, "MIN_NUMEL", 1 << 62)
    assert torch.equal(merged, METHODS[method]([e.clone() for e in experts], base.clone(), **params))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("rescale", [Rescale.KEEP_PROBABILITY, None])
def test_della_ranks_by_radix_equal_the_argsort_bit_for_bit(seed, tied, rescale, compiled, monkeypatch):
    # DELLA keeps the entry of rank r by |τ| in its row (ties in storage order) with probability
    # density − ε + 2ε·r/(n−1): the radix ranks must be the stable argsort's, entry for entry.
    delta = task_vector(seed, tied)
    delta.view(-1)[::7] *= 1e-30  # subnormal and tiny magnitudes: keys that differ only in low bytes
    compiled_out = della_(delta.clone(), 0.3, 0.2, rescale, 11, seed, "layer.weight")
    monkeypatch.setattr(compiled_topk, "MIN_NUMEL", 1 << 62)
    torch_out = della_(delta.clone(), 0.3, 0.2, rescale, 11, seed, "layer.weight")
    assert torch.equal(compiled_out.view(torch.int32), torch_out.view(torch.int32))
    assert 0 < int(torch.count_nonzero(compiled_out)) < int(torch.count_nonzero(delta))
