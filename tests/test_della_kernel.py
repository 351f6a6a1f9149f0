"""DELLA's compiled loops (``sparsify.della_merge``, ``methods/_della_kernels.py``) against the torch
kernel they replace, kept here as the reference, bit for bit: random task vectors, |τ| tied
within rows, bfloat16-valued inputs, rows of zeros, tiny and subnormal magnitudes, a row whose
magnitudes crowd one narrow range, ε = 0 (DARE), weights, λ, a density of 1, no rescale, and
tensors too small for the loops (the torch kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.methods import METHODS, compiled_topk, fused
from mergelab.methods.sparsify import mask_seed
from mergelab.methods.task_arithmetic import _plain_sum, _sign_consensus

KEY = "model.layers.3.mlp.up_proj.weight"


def reference_della(experts, base, *, weight, density, epsilon, seed, key, consensus, normalize, lam=1.0,
                    rescale=True):
    """The torch kernel as it was before the compiled loops: per task vector, DARE's draws
    (``torch.rand`` on the (seed, model, tensor) generator), keep probabilities by a stable
    argsort of |τ| within each row, mask, divide by the probability; then the weights, TIES's
    election and disjoint mean or the plain sum, λ and the base."""
    deltas = []
    for index, expert in enumerate(experts):
        delta = expert - base
        if density[index] < 1.0:
            rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
            n = rows.shape[1]
            generator = torch.Generator().manual_seed(mask_seed(seed, index, key))
            draws = torch.rand(delta.shape, generator=generator).reshape(rows.shape)
            step = 2 * epsilon[index] / (n - 1) if n > 1 else 0.0
            ramp = torch.arange(n, dtype=torch.float32).mul_(step).add_(density[index] - epsilon[index])
            order = torch.argsort(rows.abs(), dim=1, stable=True)  # rank -> column, ties in storage order
            probability = torch.empty_like(rows).scatter_(1, order, ramp.expand(rows.shape))
            rows = rows * (draws < probability)
            if rescale:
                rows = rows / probability
            delta = rows.reshape(delta.shape)
        deltas.append(delta * weight[index])
    merged = _sign_consensus(deltas, weight, normalize) if consensus else _plain_sum(deltas, weight, normalize)
    return merged * lam + base


def task_vectors(seed: int, kind: str, shape: tuple[int, ...], experts: int):
    """A base and ``experts`` experts whose task vectors are of one ``kind``."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=generator) * 0.02)
    if kind == "bfloat16":  # the checkpoints' values: τ has few significant bits, |τ| ties often
        base = base.bfloat16().float()
    result = []
    for index in range(experts):
        if kind == "tied":  # small integers: most |τ| in a row equal others
            delta = torch.randint(-4, 5, shape, generator=generator).float() / 64
        elif kind == "crowded":  # every |τ| of a row in [1, 1.002): one bucket, many distinct keys
            delta = (1 + torch.rand(shape, generator=generator) * 2e-3) * torch.randn(shape, generator=generator).sign()
        else:
            delta = torch.randn(shape, generator=generator) * 2e-3
        flat = delta.view(-1)
        flat[index * 7::29] *= 1e-33  # subnormal and tiny magnitudes, far below the row's largest
        flat[: shape[-1] if len(shape) > 1 else 50] = 0.0  # a row of zeros (part of one for 1-D)
        flat[-40:-30] = -0.0
        expert = base + delta
        result.append(expert.bfloat16().float() if kind == "bfloat16" else expert)
    return result, base


@pytest.fixture
def compiled(monkeypatch):
    if fused.compiled("_della_kernels") is None or not fused.available():
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)


def merge(name, experts, base, **params):
    return METHODS[name]([e.clone() for e in experts], base.clone(), **params)


def torch_kernel(monkeypatch, name, experts, base, **params):
    """The same merge on the torch kernel (no compiled loop anywhere)."""
    with monkeypatch.context() as patch:
        patch.setattr(fused, "MIN_NUMEL", 1 << 62)
        patch.setattr(compiled_topk, "MIN_NUMEL", 1 << 62)
        return merge(name, experts, base, **params)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


CASES = [  # (kind, shape, experts)
    ("normal", (24, 2048), 4),
    ("bfloat16", (40, 1000), 3),
    ("tied", (9, 5000), 2),
    ("crowded", (30, 300), 3),
    ("normal", (4099,), 2),
    ("bfloat16", (7, 13, 64), 4),
    ("normal", (3000, 3), 2),  # narrow rows: a few buckets an octave
    ("tied", (400, 20), 3),
    ("bfloat16", (10, 8000), 1),  # one expert
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_compiled_della_equals_the_torch_reference_bit_for_bit(case, name, compiled, monkeypatch):
    kind, shape, n = CASES[case]
    experts, base = task_vectors(case, kind, shape, n)
    params = dict(weight=[1.0] * n, density=[(0.2, 0.5, 0.35, 0.7)[i % 4] for i in range(n)],
                  epsilon=[(0.1, 0.15, 0.3, 0.05)[i % 4] for i in range(n)], seed=case, key=KEY)
    consensus = name == "della"
    expected = reference_della(experts, base, **params, consensus=consensus, normalize=consensus)
    got = merge(name, experts, base, **params)
    assert same_bits(got, expected)
    assert same_bits(torch_kernel(monkeypatch, name, experts, base, **params), expected)
    assert 0 < int(torch.count_nonzero(got - base)) < got.numel()  # something kept, something dropped


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("normalize", [True, False])
def test_weights_lambda_density_one_and_no_rescale_match_the_torch_kernel(name, normalize, compiled, monkeypatch):
    experts, base = task_vectors(11, "bfloat16", (33, 700), 4)
    consensus = name == "della"
    for extra in ({"rescale": False}, {}):
        params = dict(weight=[1.0, 0.5, 2.0, 0.3], density=[0.3, 1.0, 0.6, 0.45], epsilon=[0.2, 0.1, 0.3, 0.0],
                      normalize=normalize, seed=5, key=KEY, **{"lambda": 0.7}, **extra)
        got = merge(name, experts, base, **params)
        assert same_bits(got, torch_kernel(monkeypatch, name, experts, base, **params))
        expected = reference_della(experts, base, weight=params["weight"], density=params["density"],
                                   epsilon=params["epsilon"], seed=5, key=KEY, consensus=consensus,
                                   normalize=normalize, lam=0.7, rescale=not extra)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # (λ·x + b against the kernel's order)


@pytest.mark.parametrize("linear", [True, False])
def test_compiled_della_with_epsilon_zero_is_dare(linear, compiled):
    experts, base = task_vectors(3, "normal", (20, 4000), 3)
    common = dict(weight=[1.0, 0.7, 1.3], density=[0.3, 0.5, 0.8], normalize=True, seed=3, key=KEY)
    della = merge("della_linear" if linear else "della", experts, base, epsilon=[0.0] * 3, **common)
    dare = merge("dare_linear" if linear else "dare_ties", experts, base, **common)
    assert torch.equal(della, dare)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_small_tensors_and_a_missing_numba_take_the_torch_kernel(name, monkeypatch):
    experts, base = task_vectors(2, "tied", (16, 24), 3)  # below MIN_NUMEL
    params = dict(weight=[1.0] * 3, density=[0.4] * 3, epsilon=[0.2] * 3, seed=1, key=KEY)
    consensus = name == "della"
    expected = reference_della(experts, base, **params, consensus=consensus, normalize=consensus)
    assert same_bits(merge(name, experts, base, **params), expected)
    experts, base = task_vectors(4, "normal", (40, 2048), 2)
    monkeypatch.setattr(fused, "available", lambda: False)  # as without numba
    expected = reference_della(experts, base, **{**params, "weight": [1.0] * 2, "density": [0.4] * 2,
                                                 "epsilon": [0.2] * 2}, consensus=consensus, normalize=consensus)
    got = merge(name, experts, base, weight=[1.0] * 2, density=[0.4] * 2, epsilon=[0.2] * 2, seed=1, key=KEY)
    assert same_bits(got, expected)


def test_the_compiled_generator_draws_torch_rand_numbers_in_any_pieces(compiled):
    della_kernels = fused.compiled("_della_kernels")
    for seed, size in [(0, 10), (mask_seed(3, 1, KEY), 5000), ((1 << 63) - 1, 70_001)]:
        expected = torch.rand(size, generator=torch.Generator().manual_seed(seed)).numpy()
        state, drawn, start, piece = della_kernels.mt_seed(seed), np.empty(size, dtype=np.float32), 0, 1
        while start < size:  # pieces of 1, 4, 13, ... entries: across the generator's 624-word refills
            della_kernels.draw_row(state, drawn[start:start + piece])
            start, piece = start + piece, piece * 3 + 1
        assert np.array_equal(drawn, expected)
