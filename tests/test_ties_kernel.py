"""The TIES kernel (trim, elect, disjoint mean: one fused, in-place pass per step) against a
straightforward reference written from the paper's three steps, on random tensors, including
task vectors with many entries tied at the trim threshold, zeros, and -0.0 in the base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.methods import METHODS, fused
from mergelab.methods.sparsify import dare_mask, magnitude_trim_


def reference_ties(experts, base, weight, density, lam=1.0, normalize=True, keep_ties=True, masks=None):
    """TIES as the paper describes it, one step at a time, nothing in place."""
    deltas = []
    for index, expert in enumerate(experts):
        delta = expert - base
        if masks is not None:  # DARE-TIES: a given random mask (already rescaled or not)
            delta = delta * masks[index]
        elif density[index] < 1.0:  # trim: keep the top k by |delta|, k = int(density·numel)
            k = int(density[index] * delta.numel())
            magnitudes = delta.abs().flatten()
            if k == 0:
                keep = torch.zeros_like(delta, dtype=torch.bool)
            else:
                threshold = magnitudes.sort(descending=True).values[k - 1]
                if keep_ties:
                    keep = (delta.abs() >= threshold) & (delta != 0)
                else:  # exactly k: the tied entries first in storage order
                    above = magnitudes > threshold
                    tied = torch.nonzero(magnitudes == threshold).flatten()[: k - int(above.sum())]
                    above[tied] = True
                    keep = above.reshape(delta.shape) & (delta != 0)
            delta = torch.where(keep, delta, torch.zeros_like(delta))
        deltas.append(delta * weight[index])
    total = torch.zeros_like(base)
    for delta in deltas:
        total = total + delta
    positive = total >= 0  # elect: ties go to +
    merged, agreed = torch.zeros_like(base), torch.zeros_like(base)
    for delta, w in zip(deltas, weight):
        agrees = torch.where(positive, delta > 0, delta < 0)  # zeros never agree
        merged = merged + torch.where(agrees, delta, torch.zeros_like(delta))
        agreed = agreed + agrees.float() * w
    if normalize:
        merged = merged / torch.where(agreed == 0, torch.ones_like(agreed), agreed)
    return base + lam * merged


def random_case(seed: int, ties: bool):
    generator = torch.Generator().manual_seed(seed)
    shape = [(33,), (16, 9), (7, 5, 3)][seed % 3]
    base = torch.randn(shape, generator=generator)
    base.view(-1)[0] = -0.0
    experts = []
    for _ in range(2 + seed % 3):
        if ties:  # small integers: most |τ| tie with others, many exactly at the threshold
            delta = torch.randint(-3, 4, shape, generator=generator).float() / 8
        else:
            delta = torch.randn(shape, generator=generator) * 0.01
        experts.append(base + delta)
    return experts, base


@pytest.fixture(params=["torch", "compiled"])
def kernel(request, monkeypatch):
    """Each test runs on the torch kernel and, where numba is installed, the compiled one."""
    if request.param == "compiled":
        if not fused.available():
            pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
        monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    else:
        monkeypatch.setattr(fused, "MIN_NUMEL", 1 << 62)
    return request.param


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
def test_ties_equals_the_reference_bit_for_bit(seed, ties, kernel):
    experts, base = random_case(seed, ties)
    n = len(experts)
    density = [(0.2, 0.5, 0.9, 1.0)[(seed + i) % 4] for i in range(n)]
    for keep_ties in (True, False):
        expected = reference_ties(experts, base, [1.0] * n, density, keep_ties=keep_ties)
        got = METHODS["ties"]([e.clone() for e in experts], base.clone(), weight=[1.0] * n, density=density,
                              keep_ties=keep_ties)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("seed", range(6))
def test_weighted_ties_and_lambda_match_the_reference(seed, kernel):
    """Weights enter before the election (as mergekit); the divisor is the agreeing weight."""
    experts, base = random_case(seed, ties=seed % 2 == 0)
    n = len(experts)
    weight = [(1.0, 0.5, 2.0, 0.25)[i % 4] for i in range(n)]
    expected = reference_ties(experts, base, weight, [0.5] * n, lam=0.7)
    got = METHODS["ties"]([e.clone() for e in experts], base.clone(), weight=weight, density=[0.5] * n,
                          **{"lambda": 0.7})
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_no_normalize_is_the_disjoint_sum(kernel):
    experts, base = random_case(3, ties=True)
    n = len(experts)
    expected = reference_ties(experts, base, [1.0] * n, [0.5] * n, normalize=False)
    got = METHODS["ties"]([e.clone() for e in experts], base.clone(), weight=[1.0] * n, density=[0.5] * n,
                          normalize=False)
    assert torch.equal(got, expected)


def test_dare_ties_uses_the_same_election_as_the_reference():
    experts, base = random_case(4, ties=False)
    n = len(experts)
    masks = [dare_mask(base.shape, 0.5, 7, i, "w").float() / 0.5 for i in range(n)]
    expected = reference_ties(experts, base, [1.0] * n, [0.5] * n, masks=masks, normalize=True)
    got = METHODS["dare_ties"]([e.clone() for e in experts], base.clone(), weight=[1.0] * n, density=[0.5] * n,
                               normalize=True, seed=7, key="w")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hand_computed_election(kernel):
    """Three task vectors on four entries, density 1: elect + disjoint mean by hand."""
    base = torch.zeros(4)
    experts = [torch.tensor([1.0, -2.0, 3.0, 0.0]),
               torch.tensor([-3.0, 1.0, 1.0, 0.0]),
               torch.tensor([1.0, -1.0, -5.0, 0.0])]
    # sums: -1 (γ -), -2 (γ -), -1 (γ -), 0 (γ +, nothing agrees)
    got = METHODS["ties"]([e.clone() for e in experts], base, weight=[1.0] * 3, density=[1.0] * 3)
    assert torch.equal(got, torch.tensor([-3.0, -1.5, -5.0, 0.0]))
    assert not got[3].signbit()  # an entry nothing agrees on is +0.0, not -0.0


def test_trim_keeps_every_entry_tied_at_the_threshold_and_never_a_zero():
    delta = torch.tensor([0.0, 1.0, -1.0, 1.0, 0.5, -0.0, 2.0, 0.25])
    magnitude_trim_(delta, 0.25)  # k = 2: 2.0 and the three tied 1.0s
    assert torch.equal(delta, torch.tensor([0.0, 1.0, -1.0, 1.0, 0.0, -0.0, 2.0, 0.0]))
    only_zeros = torch.zeros(8)
    magnitude_trim_(only_zeros, 0.5)
    assert torch.equal(only_zeros, torch.zeros(8))
    scratch = magnitude_trim_(torch.ones(8), 0.5)
    assert scratch.shape == (8,) and magnitude_trim_(torch.ones(8), 0.5, scratch=scratch) is scratch


def test_compiled_kernel_is_the_torch_kernel_bit_for_bit(monkeypatch):
    """Weights of both signs, λ, densities from 0.001 to 1, -0.0 in the base, many ties."""
    if not fused.available():
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    generator = torch.Generator().manual_seed(11)
    for case in range(24):
        n, shape = 1 + case % 4, [(4096,), (37, 61), (3, 5, 7)][case % 3]
        base = torch.randn(shape, generator=generator).to(torch.bfloat16).float()
        base.view(-1)[::7] = -0.0
        experts = [base + torch.randint(-2, 3, shape, generator=generator).float() / 16 if i % 2 else
                   (base + torch.randn(shape, generator=generator) * 0.01).to(torch.bfloat16).float() for i in range(n)]
        weight = [[1.0] * n, [0.5] * n, [-0.5] * n, [(1.0, -0.3, 2.0, 0.25)[i] for i in range(n)]][case % 4]
        params = dict(weight=weight, density=[(0.001, 0.2, 0.999, 1.0)[(case + i) % 4] for i in range(n)],
                      normalize=case % 3 != 0, **{"lambda": (1.0, 0.7, -1.0)[case % 3]})
        if params["normalize"] and abs(sum(weight)) < 1e-9:
            continue
        results = []
        for minimum in (1 << 62, 0):
            monkeypatch.setattr(fused, "MIN_NUMEL", minimum)
            results.append(METHODS["ties"]([e.clone() for e in experts], base.clone(), **params))
        assert torch.equal(results[0].view(torch.int32), results[1].view(torch.int32)), case


def bfloat16_case(seed: int, n: int = 2, numel: int = 5000):
    """bfloat16 checkpoints (as the benchmark's) whose task vectors tie often: half the experts
    move by small multiples of 1/64, so many |τ| equal the trim threshold exactly."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator).to(torch.bfloat16)
    base[::11] = -0.0
    experts = [(base.float() + (torch.randint(-3, 4, (numel,), generator=generator).float() / 64 if i % 2 else
                                torch.randn(numel, generator=generator) * 0.01)).to(torch.bfloat16) for i in range(n)]
    return experts, base


@pytest.mark.parametrize("seed", range(6))
def test_first_pass_is_the_reference_on_bfloat16_inputs(seed):
    """Pass 1 on float32 copies of bfloat16 checkpoints: τ = θ_i − θ_b bit for bit, the histogram
    of the top 16 bits of |τ|, and |τ| of exactly the entries whose bucket is in the window, in
    storage order (what the threshold is then read from)."""
    if not fused.available():
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    delta_histogram = fused._kernels()[0]
    experts, base = bfloat16_case(seed)
    for expert in experts:
        expected = expert.float() - base.float()
        top = expected.abs().view(torch.int32) >> 16  # (numel,) bucket per entry
        low = int(torch.quantile(top.float(), 0.7))
        high = low + seed % 3
        for capacity in (expected.numel(), 7):  # room for every candidate, and too little
            delta, candidates = expert.float().numpy(), np.empty(capacity, dtype=np.float32)
            counts, found, complete = delta_histogram(delta, base.float().numpy(), low, high, candidates)
            assert torch.equal(torch.from_numpy(delta).view(torch.int32), expected.view(torch.int32))
            assert torch.equal(torch.from_numpy(counts), torch.bincount(top, minlength=1 << 15))
            in_window = expected.abs()[(top >= low) & (top <= high)]
            assert complete == (in_window.numel() <= capacity) and found == min(in_window.numel(), capacity)
            assert torch.equal(torch.from_numpy(candidates[:found]), in_window[:found])


@pytest.mark.parametrize("window", ["guessed", "missed", "overflowing"])
def test_compiled_thresholds_do_not_depend_on_the_guessed_window(window, monkeypatch):
    """The threshold buckets are guessed from a sample: a guess that misses the bucket, or a
    window with more entries than the candidate buffer holds, costs a second pass, never a
    different result (bfloat16 task vectors with many entries tied at the threshold)."""
    if not fused.available():
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    experts, base = bfloat16_case(5, n=4, numel=20000)
    if window == "missed":
        monkeypatch.setattr(fused, "_likely_buckets", lambda expert, base, k: (1, 2))
    elif window == "overflowing":
        monkeypatch.setattr(fused, "_likely_buckets", lambda expert, base, k: (0, (1 << 15) - 1))
        monkeypatch.setattr(fused, "CANDIDATES_MIN", 16)
        monkeypatch.setattr(fused, "CANDIDATES_SHARE", 1 << 20)
    params = dict(weight=[1.0] * 4, density=[0.2, 0.05, 0.5, 0.2])
    results = []
    for minimum in (1 << 62, 0):  # the torch kernel, then the compiled one
        monkeypatch.setattr(fused, "MIN_NUMEL", minimum)
        results.append(METHODS["ties"]([e.float() for e in experts], base.float(), **params))
    assert torch.equal(results[0].view(torch.int32), results[1].view(torch.int32))
    expected = reference_ties([e.float() for e in experts], base.float(), params["weight"], params["density"])
    assert torch.equal(results[1].view(torch.int32), expected.view(torch.int32))


def test_the_equal_weight_mean_loop_is_the_general_loop_bit_for_bit():
    """``combine_equal_mean`` (equal weights > 0, disjoint mean: TIES's usual case) against the
    general ``combine`` on the same task vectors: NaN, ±inf, -0.0 and zeros among them, trim
    thresholds from −inf to +inf, one to five experts, λ of 1 and not."""
    if not fused.available():
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    kernels = fused.compiled("_fused_kernels")
    generator = torch.Generator().manual_seed(3)
    for experts in range(1, 6):
        for weight, lam in ((1.0, 1.0), (0.5, 0.7), (2.0, -1.0)):
            numel = 4096 * 2 + 37  # two whole blocks and a partial one
            base = torch.randn(numel, generator=generator)
            base[::5] = -0.0
            deltas = [torch.randint(-3, 4, (numel,), generator=generator).float() / 8 for _ in range(experts)]
            for delta in deltas:
                delta[torch.randint(0, numel, (40,), generator=generator)] = float("nan")
                delta[torch.randint(0, numel, (20,), generator=generator)] = float("inf")
                delta[torch.randint(0, numel, (20,), generator=generator)] = -0.0
            thresholds = np.array([(-np.inf, 0.25, np.inf, 0.125, 0.375)[e] for e in range(experts)], dtype=np.float32)
            outputs = []
            for special in (False, True):
                out = np.empty(numel, dtype=np.float32)
                inputs = tuple(d.numpy() for d in deltas)
                if special:
                    kernels.combine_equal_mean(inputs, thresholds, np.float32(weight), np.float32(lam), base.numpy(), out)
                else:
                    kernels.combine(inputs, thresholds, np.full(experts, weight, dtype=np.float32), np.float32(lam),
                                    True, True, base.numpy(), out)
                outputs.append(out)
            assert np.array_equal(outputs[0].view(np.uint32), outputs[1].view(np.uint32)), (experts, weight, lam)


def test_the_threshold_inside_its_bucket_is_the_kth_largest_of_that_bucket():
    """``kth_in_bucket`` reads only the values of its bucket (top 16 bits) and counts ties: the
    needed-th largest of them, as a sort finds it."""
    if not fused.available():
        pytest.skip("numba is not installed (pip install 'mergelab[fast]')")
    kth_in_bucket = fused.compiled("_fused_kernels").kth_in_bucket
    generator = torch.Generator().manual_seed(4)
    values = (torch.rand(5000, generator=generator) * 0.01 + 0.0025).to(torch.bfloat16).float()  # many ties
    values = torch.cat([values, values[:300] * 1.01])
    bits = values.view(torch.int32)
    for bucket in sorted(set((bits >> 16).tolist()))[:6]:
        in_bucket = values[(bits >> 16) == bucket].sort(descending=True).values
        for needed in (1, len(in_bucket) // 2, len(in_bucket)):
            found = np.uint32(kth_in_bucket(values.numpy(), bucket, needed)).view(np.float32)
            assert found == in_bucket[needed - 1].item()
