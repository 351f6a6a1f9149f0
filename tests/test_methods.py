"""The formulas of DESIGN.md, checked on hand-computed cases and on properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mergelab import MergelabError
from mergelab.methods import METHODS
from mergelab.methods.sparsify import dare_mask, magnitude_mask, magnitude_threshold


def call(name, tensors, base=None, **params):
    """Call a method on clones (methods may overwrite their inputs)."""
    return METHODS[name]([t.clone() for t in tensors], None if base is None else base.clone(), **params)


def tv(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- linear ------------------------------------------------------------------------------------
def test_linear_hand_computed():
    out = call("linear", [tv(1, 2), tv(3, 6)], weight=[1, 3], normalize=True)
    assert torch.allclose(out, tv(2.5, 5.0))  # (1·[1,2] + 3·[3,6]) / 4


def test_linear_without_normalize_is_a_plain_weighted_sum():
    out = call("linear", [tv(1, 2), tv(3, 6)], weight=[1, 3], normalize=False)
    assert torch.allclose(out, tv(10, 20))


def test_averaging_identical_models_is_the_identity():
    theta = torch.randn(5, 7)
    assert torch.allclose(call("linear", [theta] * 4, weight=[1] * 4, normalize=True), theta)


def test_linear_zero_weight_sum_is_refused():
    with pytest.raises(MergelabError, match="sum to zero"):
        call("linear", [tv(1), tv(2)], weight=[1, -1], normalize=True)


# -- task arithmetic -----------------------------------------------------------------------------
def test_task_arithmetic_hand_computed():
    base = tv(1, 1, 1)
    out = call("task_arithmetic", [tv(2, 1, 0), tv(1, 3, 1)], base, weight=[1, 0.5], normalize=False,
               **{"lambda": 0.5})
    # τ = [1,0,-1], [0,2,0]; Σ w τ = [1,1,-1]; θ = 1 + 0.5·[1,1,-1]
    assert torch.allclose(out, tv(1.5, 1.5, 0.5))


def test_task_arithmetic_normalize_divides_by_weight_sum():
    base = tv(0, 0)
    out = call("task_arithmetic", [tv(2, 0), tv(0, 4)], base, weight=[1, 1], normalize=True, **{"lambda": 1.0})
    assert torch.allclose(out, tv(1, 2))


# -- TIES ----------------------------------------------------------------------------------------
def test_ties_hand_computed():
    base = torch.zeros(4)
    experts = [tv(3, -1, 2, 0.5), tv(-2, -2, 1, 0.1), tv(1, 4, -1, -0.2)]
    out = call("ties", experts, base, weight=[1, 1, 1], density=[1, 1, 1], normalize=True, **{"lambda": 1.0})
    # entry 0: Σ = 2 > 0 → mean(3, 1) = 2; entry 1: Σ = 1 > 0 → 4; entry 2: Σ = 2 → mean(2, 1) = 1.5
    # entry 3: Σ = 0.4 → mean(0.5, 0.1) = 0.3
    assert torch.allclose(out, tv(2, 4, 1.5, 0.3))


def test_ties_trim_keeps_top_k_by_magnitude_before_election():
    base = torch.zeros(4)
    experts = [tv(4, -3, 2, 1), tv(-1, 1, 1, 1)]
    out = call("ties", experts, base, weight=[1, 1], density=[0.5, 0.5], normalize=True, **{"lambda": 1.0})
    # trimmed: [4,-3,0,0] and [-1,1,1,1] (ties at the threshold 1 are all kept)
    # Σ = [3,-2,1,1] → signs +,-,+,+ → [4, -3, 1, 1]
    assert torch.allclose(out, tv(4, -3, 1, 1))


def test_ties_of_one_expert_at_full_density_returns_the_expert():
    base, expert = torch.randn(6, 5), torch.randn(6, 5)
    out = call("ties", [expert], base, weight=[1], density=[1], normalize=True, **{"lambda": 1.0})
    assert torch.allclose(out, expert, atol=1e-6)


def test_ties_is_invariant_to_expert_order():
    base = torch.randn(8, 8)
    experts = [base + torch.randn(8, 8) for _ in range(3)]
    results = [call("ties", list(order), base, weight=[1] * 3, density=[0.3] * 3, normalize=True,
                    **{"lambda": 1.0}) for order in itertools.permutations(experts)]
    for result in results[1:]:
        assert torch.allclose(result, results[0], atol=1e-6)


def test_ties_weights_enter_before_the_sign_election():
    base = torch.zeros(1)
    # unweighted Σ = 3 - 2 = 1 (> 0); weighted Σ = 0.1·3 - 1·2 < 0: the weighted vote wins
    out = call("ties", [tv(3), tv(-2)], base, weight=[0.1, 1.0], density=[1, 1], normalize=True, **{"lambda": 1.0})
    assert torch.allclose(out, tv(-2.0))  # (1·-2) / 1


def test_ties_without_normalize_is_the_disjoint_sum_scaled_by_lambda():
    base = tv(1, 1)
    out = call("ties", [tv(2, 0), tv(3, 0)], base, weight=[1, 1], density=[1, 1], normalize=False,
               **{"lambda": 0.5})
    assert torch.allclose(out, tv(1 + 0.5 * 3, 1 + 0.5 * -2))


# -- exact top-k ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,density", [(10, 0.2), (1000, 0.2), (4096, 0.5), (100_003, 0.01), (7, 0.8)])
def test_magnitude_threshold_is_the_exact_kth_largest(n, density):
    values = torch.randn(n).abs()
    k = int(density * n)  # mergekit's count: int(), not round()
    expected = torch.topk(values, k).values.min()
    assert magnitude_threshold(values, k) == pytest.approx(float(expected), abs=0)
    assert int(magnitude_mask(torch.randn(n) * 0 + values, density).sum()) == k


def test_magnitude_threshold_handles_heavy_ties_and_zeros():
    values = torch.tensor([0.0] * 50 + [1.0] * 30 + [2.0] * 20)
    assert magnitude_threshold(values, 20) == 2.0
    assert magnitude_threshold(values, 25) == 1.0
    assert magnitude_threshold(values, 90) == 0.0
    mask = magnitude_mask(values, 0.9)
    assert int(mask.sum()) == 50  # zeros are never "kept": they carry nothing


# -- DARE ----------------------------------------------------------------------------------------
def test_dare_survivors_equal_tau_over_keep_probability():
    base = torch.zeros(1000)
    expert = torch.randn(1000)
    out = call("dare_linear", [expert], base, weight=[1], density=[0.3], normalize=False, rescale=True,
               seed=5, key="w", **{"lambda": 1.0})
    kept = out != 0
    assert torch.allclose(out[kept], expert[kept] / 0.3)
    assert 0.2 < kept.float().mean() < 0.4
    assert torch.equal(kept, dare_mask(expert.shape, 0.3, 5, 0, "w"))


def test_dare_mask_depends_only_on_seed_model_index_and_name():
    first = dare_mask((64, 64), 0.5, seed=1, model_index=0, key="a.weight")
    torch.rand(100)  # global RNG state must not matter
    assert torch.equal(first, dare_mask((64, 64), 0.5, seed=1, model_index=0, key="a.weight"))
    assert not torch.equal(first, dare_mask((64, 64), 0.5, seed=2, model_index=0, key="a.weight"))
    assert not torch.equal(first, dare_mask((64, 64), 0.5, seed=1, model_index=1, key="a.weight"))
    assert not torch.equal(first, dare_mask((64, 64), 0.5, seed=1, model_index=0, key="b.weight"))


def test_dare_ties_is_dare_then_ties():
    base = torch.randn(200)
    experts = [base + torch.randn(200) for _ in range(3)]
    out = call("dare_ties", experts, base, weight=[1] * 3, density=[0.5] * 3, normalize=True, rescale=True,
               seed=3, key="k", **{"lambda": 1.0})
    dropped = [base + (e - base) * dare_mask(e.shape, 0.5, 3, i, "k") / 0.5 for i, e in enumerate(experts)]
    expected = call("ties", dropped, base, weight=[1] * 3, density=[1] * 3, normalize=True, **{"lambda": 1.0})
    assert torch.allclose(out, expected, atol=1e-5)


def test_dare_at_full_density_is_task_arithmetic():
    base = torch.randn(30)
    experts = [base + torch.randn(30) for _ in range(2)]
    dare = call("dare_linear", experts, base, weight=[1, 1], density=[1, 1], normalize=False, seed=0, key="x",
                **{"lambda": 0.7})
    ta = call("task_arithmetic", experts, base, weight=[1, 1], normalize=False, **{"lambda": 0.7})
    assert torch.allclose(dare, ta, atol=1e-6)


# -- SLERP ---------------------------------------------------------------------------------------
def test_slerp_endpoints_and_midpoint_on_orthogonal_vectors():
    a, b = tv(1, 0), tv(0, 1)
    assert torch.allclose(call("slerp", [b], a, t=0.0), a)
    assert torch.allclose(call("slerp", [b], a, t=1.0), b, atol=1e-6)
    half = math.sqrt(0.5)
    assert torch.allclose(call("slerp", [b], a, t=0.5), tv(half, half), atol=1e-6)  # on the unit circle


def test_slerp_keeps_the_norm_between_equal_norm_vectors():
    a, b = torch.randn(100), torch.randn(100)
    b = b / b.norm() * a.norm()
    for t in (0.2, 0.5, 0.9):
        assert float(call("slerp", [b], a, t=t).norm()) == pytest.approx(float(a.norm()), rel=1e-5)


def test_slerp_from_a_zero_tensor_follows_the_quarter_circle_as_mergekit():
    # a zero tensor is not normalized, so its cosine with anything is 0: the angle is π/2
    b = tv(3, 4)
    assert torch.allclose(call("slerp", [b], torch.zeros(2), t=0.5), math.sin(math.pi / 4) * b)


def test_slerp_falls_back_to_linear_for_parallel_tensors():
    a = tv(1, 2, 3)
    assert torch.allclose(call("slerp", [2 * a], a, t=0.25), 1.25 * a)


# -- Model Stock ---------------------------------------------------------------------------------
def test_model_stock_hand_computed():
    base = tv(0, 0)
    experts = [tv(1, 0), tv(1, 1)]  # cos = 1/√2
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert torch.allclose(call("model_stock", experts, base), t * tv(1, 0.5), atol=1e-6)


def test_model_stock_of_identical_experts_is_their_average():
    base, expert = torch.randn(4, 4), torch.randn(4, 4)
    assert torch.allclose(call("model_stock", [expert, expert, expert], base), expert, atol=1e-6)


def test_model_stock_of_opposed_experts_is_the_base():
    base = torch.randn(10)
    delta = torch.randn(10)
    assert torch.allclose(call("model_stock", [base + delta, base - delta], base), base, atol=1e-6)


def test_model_stock_without_a_cosine_floor_follows_negative_cosines_as_mergekit():
    base = tv(0, 0)
    experts = [tv(1, 0), tv(-1, 1)]  # cos = −1/√2
    cos = -1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)  # about −4.83: mergekit's t, unfloored
    assert torch.allclose(call("model_stock", experts, base, cosine_floor=-1.0), t * tv(0, 0.5), atol=1e-5)
    assert torch.allclose(call("model_stock", experts, base), base)  # the default floor 0 gives t = 0


def test_model_stock_counts_a_zero_task_vector_as_orthogonal():
    base = torch.randn(6)
    out = call("model_stock", [base.clone(), base + torch.randn(6)], base)  # ‖τ_1‖·‖τ_2‖ = 0: cos 0, t 0
    assert torch.allclose(out, base)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    experts = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])]
    out = call("model_stock", experts, base, filter_wise=True)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # row 0 agrees (t=1), row 1 opposes (t=0)


# -- Fisher --------------------------------------------------------------------------------------
def test_fisher_hand_computed():
    out = call("fisher", [tv(1, 1), tv(3, 5)], weight=[1, 1], fisher=[tv(1, 3), tv(3, 1)], epsilon=1e-12)
    assert torch.allclose(out, tv((1 + 9) / 4, (3 + 5) / 4))


def test_fisher_with_equal_information_is_the_weighted_average():
    experts = [torch.randn(9), torch.randn(9)]
    ones = [torch.ones(9), torch.ones(9)]
    out = call("fisher", experts, weight=[1, 3], fisher=ones)
    assert torch.allclose(out, (experts[0] + 3 * experts[1]) / 4, atol=1e-6)


def test_fisher_without_information_falls_back_to_the_average():
    experts = [torch.randn(3), torch.randn(3)]
    out = call("fisher", experts, weight=[1, 1], fisher=[torch.zeros(3), torch.zeros(3)])
    assert torch.allclose(out, (experts[0] + experts[1]) / 2, atol=1e-6)


# -- LM-Cocktail ---------------------------------------------------------------------------------
def test_lm_cocktail_eq1_hand_computed():
    tuned, base, peer = tv(4, 0), tv(0, 0), tv(0, 8)
    out = call("lm_cocktail", [tuned, base, peer], weight=[123, 3, 1], alpha=0.5)
    # 0.5·[4,0] + 0.5·(0.75·[0,0] + 0.25·[0,8]); the first model's own weight is ignored
    assert torch.allclose(out, tv(2, 1))


def test_lm_cocktail_mono_specialist_is_alpha_interpolation():
    tuned, base = torch.randn(5), torch.randn(5)
    out = call("lm_cocktail", [tuned, base], weight=[1, 1], alpha=0.3)
    assert torch.allclose(out, 0.3 * tuned + 0.7 * base, atol=1e-6)


# -- registry ------------------------------------------------------------------------------------
def test_every_method_documents_a_paper_and_its_parameters():
    for name, method in METHODS.items():
        assert method.name == name and method.paper and method.summary
        assert len({p.name for p in method.params}) == len(method.params)


def test_methods_do_not_modify_the_base_tensor():
    base = torch.randn(16)
    kept = base.clone()
    experts = [base + torch.randn(16) for _ in range(2)]
    for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
                 "della_linear", "sce", "ram", "ramplus_tl", "model_stock"):
        params = METHODS[name].defaults(2)
        params.update({key: value for key, value in (("weight", [1.0, 0.5]), ("density", [0.5, 0.5]))
                       if METHODS[name].param(key)})
        if METHODS[name].uses_seed:
            params.update(seed=0, key="k")
        METHODS[name]([e.clone() for e in experts], base, **params)
        assert torch.equal(base, kept), name


def test_the_registry_is_the_one_source_of_defaults():
    """The pure functions take no parameter defaults; a registered method fills them in."""
    import inspect

    for name, method in METHODS.items():
        signature = inspect.signature(method.fn).parameters
        for param in method.tensor_params:
            if param.name in signature:
                assert signature[param.name].default is inspect.Parameter.empty, (name, param.name)


def test_a_registered_method_applies_its_registry_defaults():
    base = torch.zeros(10)
    experts = [torch.randn(10), torch.randn(10)]
    implicit = call("ties", experts, base, weight=[1.0, 1.0])
    explicit = call("ties", experts, base, weight=[1.0, 1.0], density=[1.0, 1.0], normalize=True, rescale=False,
                    keep_ties=True, **{"lambda": 1.0})
    assert torch.equal(implicit, explicit)


def test_weight_is_required_where_mergekit_requires_it():
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della"):
        with pytest.raises(TypeError, match="needs weight"):
            call(name, [tv(1.0), tv(2.0)], tv(0.0))


@pytest.mark.parametrize("argument", ["sparsify", "consensus"])
def test_a_misspelt_sparsify_or_consensus_fails_instead_of_meaning_none(argument):
    from mergelab.methods.task_arithmetic import generalized_task_arithmetic

    arguments = {"sparsify": None, "consensus": None, argument: "magnitud"}
    with pytest.raises(ValueError, match="'magnitud' is not a valid"):
        generalized_task_arithmetic([tv(1)], tv(0), weight=[1], normalize=False, density=[1], rescale=None,
                                    rescale_l1=None, gamma=None, epsilon=None, keep_ties=None, seed=None, key=None,
                                    **arguments, **{"lambda": 1.0})


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_normalize_with_weights_summing_to_zero_is_refused_by_the_plan_check(name):
    method = METHODS[name]
    params = {**method.defaults(2), "weight": [1.0, -1.0], "normalize": True}
    assert "sum to zero" in method.check(params, "for tensor 'x'")
    assert method.check({**params, "normalize": False}, "for tensor 'x'") is None


def test_task_arithmetic_never_divides_weights_summing_to_zero_by_one():
    with pytest.raises(MergelabError, match="sum to zero"):
        call("task_arithmetic", [tv(1), tv(2)], tv(0), weight=[1, -1], normalize=True)
