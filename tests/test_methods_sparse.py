"""mergekit's sparsifying methods (Breadcrumbs, DELLA, SCE, RAM, passthrough) and mergekit's
defaults: hand-computed cases from the papers' formulas, properties, and end-to-end merges."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import mergelab
from mergelab.config import evaluate_setting, layer_position, load_config
from mergelab.io import CheckpointReader
from mergelab.methods import METHODS
from mergelab.methods.sparsify import dare_uniform, magnitude_mask, outlier_mask


def call(name, tensors, base=None, **params):
    """Call a method on clones (methods may overwrite their inputs)."""
    return METHODS[name]([t.clone() for t in tensors], None if base is None else base.clone(), **params)


def tv(*values):
    return torch.tensor(values, dtype=torch.float32)


def state(path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    try:
        return {name: reader.get(name) for name in reader.tensors}
    finally:
        reader.close()


RAMP = tv(1, -2, 3, -4, 5, -6, 7, -8, 9, -10)  # |τ| = 1..10


# -- Model Breadcrumbs ------------------------------------------------------------------------------
def test_breadcrumbs_drops_the_top_gamma_and_the_bottom_keeping_density():
    # n = 10, density 0.5 keeps 5, gamma 0.1 drops the single largest (|−10|), then the 5 next are kept
    out = call("breadcrumbs", [RAMP], torch.zeros(10), weight=[1.0], density=[0.5], gamma=[0.1])
    assert torch.equal(out, tv(0, 0, 0, 0, 5, -6, 7, -8, 9, 0))


def test_breadcrumbs_drops_fewer_outliers_when_gamma_and_density_exceed_one():
    # density 0.8 keeps 8; gamma 0.5 would drop 5 of the largest, but only 10 − 8 = 2 may go
    mask = outlier_mask(RAMP, 0.8, 0.5)
    assert torch.equal(mask, tv(1, 1, 1, 1, 1, 1, 1, 1, 0, 0).bool())


def test_breadcrumbs_is_task_arithmetic_of_the_masked_weighted_task_vectors():
    base = tv(*[1.0] * 10)
    other = RAMP.flip(0) * 0.5  # |τ| = 5, 4.5, ..., 0.5
    out = call("breadcrumbs", [base + RAMP, base + other], base, weight=[1.0, 2.0], density=[0.3, 0.3],
               gamma=[0.2, 0.2], **{"lambda": 0.5})
    # keep 3 after dropping the top 2: RAMP keeps |τ| 8, 7, 6; other keeps |τ| 4, 3.5, 3 (indices 2, 3, 4)
    first = tv(0, 0, 0, 0, 0, -6, 7, -8, 0, 0)
    second = tv(0, 0, -4, 3.5, -3, 0, 0, 0, 0, 0)
    assert torch.allclose(out, base + 0.5 * (first + 2 * second))


def test_breadcrumbs_ties_elects_signs_over_the_breadcrumbs_masks():
    base = torch.zeros(4)
    first, second = tv(3, -1, 2, 10), tv(-1, 2, 2, 10)
    # density 0.5 keeps 2 of 4; gamma 0.25 drops the largest (the 10s): first keeps 3, 2; second keeps 2, 2
    out = call("breadcrumbs_ties", [first, second], base, weight=[1.0, 1.0], density=[0.5, 0.5], gamma=[0.25, 0.25])
    # masked: first (3, 0, 2, 0), second (0, 2, 2, 0); elected signs all +; a disjoint *sum* (normalize: false)
    assert torch.equal(out, tv(3, 2, 4, 0))
    normalized = call("breadcrumbs_ties", [first, second], base, weight=[1.0, 1.0], density=[0.5, 0.5],
                      gamma=[0.25, 0.25], normalize=True)
    assert torch.equal(normalized, tv(3, 2, 2, 0))


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
def test_breadcrumbs_with_gamma_zero_is_ties_trimming(density):
    torch.manual_seed(0)
    base = torch.randn(32, 16)
    experts = [base + torch.randn(32, 16) for _ in range(3)]
    common = dict(weight=[1.0, 0.5, 2.0], density=[density] * 3, normalize=True)
    crumbs = call("breadcrumbs_ties", experts, base, gamma=[0.0] * 3, **common)
    assert torch.equal(crumbs, call("ties", experts, base, **common))
    assert torch.equal(outlier_mask(experts[0] - base, density, 0.0), magnitude_mask(experts[0] - base, density))


# -- DELLA -------------------------------------------------------------------------------------------
def test_della_keeps_each_entry_with_its_rank_probability_and_rescales_by_it():
    # one row, |τ| ranks 0..3 for (0.1, 0.4, 0.2, 0.3): p = density − ε + 2ε·rank/3 with density 0.5, ε 0.1
    row = tv(0.1, -0.4, 0.2, 0.3)
    probability = tv(0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3)
    draws = dare_uniform(row.shape, 5, 0, "w")
    out = call("della_linear", [row], torch.zeros(4), weight=[1.0], density=[0.5], epsilon=[0.1], seed=5, key="w")
    expected = torch.where(draws < probability, row / probability, torch.zeros(4))
    assert torch.allclose(out, expected)


def test_della_keep_frequencies_follow_the_magnitude_ranks_within_each_row():
    rows = tv(0.1, -0.4, 0.2, 0.3).repeat(20_000, 1)  # (20000, 4): every row ranked alike
    out = call("della_linear", [rows], torch.zeros_like(rows), weight=[1.0], density=[0.5], epsilon=[0.1],
               rescale=False, seed=0, key="w")
    frequency = (out != 0).float().mean(dim=0)
    assert torch.allclose(frequency, tv(0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3), atol=0.015)


@pytest.mark.parametrize("linear", [True, False])
def test_della_with_epsilon_zero_is_dare(linear):
    torch.manual_seed(1)
    base = torch.randn(16, 24)
    experts = [base + torch.randn(16, 24) for _ in range(3)]
    common = dict(weight=[1.0, 0.7, 1.3], density=[0.3, 0.5, 0.8], normalize=True, seed=3, key="layer.w")
    della = call("della_linear" if linear else "della", experts, base, epsilon=[0.0] * 3, **common)
    dare = call("dare_linear" if linear else "dare_ties", experts, base, **common)
    assert torch.equal(della, dare)


def test_della_refuses_keep_probabilities_outside_zero_one():
    check = METHODS["della"].check
    params = {"density": [0.5, 0.1], "epsilon": [0.15, 0.15], "weight": [1.0, 1.0], "normalize": True}
    assert "density 0.1 ± epsilon 0.15" in check(params, "for tensor 'w'")
    assert check({**params, "density": [0.5, 1.0]}, "for tensor 'w'") is None  # density 1 thins nothing


def test_rescale_l1_restores_the_task_vector_l1_norm():
    tau = torch.randn(64, 8)
    out = call("della_linear", [tau], torch.zeros_like(tau), weight=[1.0], density=[0.4], epsilon=[0.2],
               rescale_l1=True, seed=0, key="w")
    assert float(out.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    out = call("dare_linear", [tau], torch.zeros_like(tau), weight=[1.0], density=[0.4], rescale_l1=True,
               seed=0, key="w")
    assert float(out.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)


# -- SCE ---------------------------------------------------------------------------------------------
FIRST, SECOND = tv(2, 0, -1, 1), tv(0, 0, 3, 3)


def test_sce_weights_from_mean_squares_and_erases_minority_signs():
    # mean squares 6/4 and 18/4: η = 0.25, 0.75. Σ τ = (2, 0, 2, 4): every elected sign is +.
    # entry 0: only FIRST agrees -> 2; entry 1: none -> 0; entry 2: only SECOND -> 3;
    # entry 3: both -> (0.25·1 + 0.75·3) / (0.25 + 0.75) = 2.5
    out = call("sce", [1 + FIRST, 1 + SECOND], torch.ones(4))
    assert torch.allclose(out, 1 + tv(2, 0, 3, 2.5))


def test_sce_selects_the_top_positions_by_variance():
    # variances (1, 0, 4, 1): 3 non-zero, select_topk 0.5 keeps int(1.5) = 1 position, the third
    out = call("sce", [FIRST, SECOND], torch.zeros(4), select_topk=0.5)
    assert torch.allclose(out, tv(0, 0, 3, 0))


def test_sce_weighs_tiny_task_vectors_equally():
    # mean squares summing to under 1e-6 give uniform weights (mergekit): entry 3 is the plain mean
    out = call("sce", [FIRST * 1e-4, SECOND * 1e-4], torch.zeros(4))
    assert torch.allclose(out, tv(2, 0, 3, 2) * 1e-4)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sce_variance_in_blocks_equals_the_whole_tensor_formula(monkeypatch, dtype):
    # The variance pass works block by block to save two whole tensors; the result is the
    # population variance entry by entry, and the merge does not depend on the block size.
    import importlib

    sce_module = importlib.import_module("mergelab.methods.sce")  # the package re-exports the function as `sce`

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(37, 129, generator=generator, dtype=dtype)
    experts = [base + torch.randn(37, 129, generator=generator, dtype=dtype).mul(0.01).round(decimals=3)
               for _ in range(4)]
    deltas = [e - base for e in experts]
    assert torch.allclose(sce_module._variance([d.clone() for d in deltas]),
                          torch.stack(deltas).var(dim=0, unbiased=False).float(), rtol=1e-5, atol=1e-12)
    whole = call("sce", experts, base, select_topk=0.3)
    monkeypatch.setattr(sce_module, "CHUNK", 1000)  # 37·129 = 4773 entries: 5 blocks, the last one short
    assert torch.equal(call("sce", experts, base, select_topk=0.3), whole)

# -- RAM ---------------------------------------------------------------------------------------------
RAM_EXPERTS = [tv(1, 0, 2, 1e-6), tv(0, 0, 4, 0), tv(0, -3, 0, 0)]


@pytest.mark.parametrize("method,params", [("ram", {"epsilon": 1e-3}),
                                           ("ramplus_tl", {"epsilon": 1e-3, "r": 0.5, "alpha": 0.2})])
def test_ram_in_blocks_does_not_depend_on_the_block_size(monkeypatch, method, params):
    # RAM works block by block (only the task vectors and the base are whole tensors); RAM+'s λ_i
    # still counts over the whole tensor, so the result is the same for any block size.
    import importlib

    ram_module = importlib.import_module("mergelab.methods.ram")
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(37, 129, generator=generator)
    experts = [base + torch.randn(37, 129, generator=generator).mul(0.01)
               * (torch.rand(37, 129, generator=generator) < 0.3) for _ in range(3)]
    whole = call(method, experts, base, **params)
    monkeypatch.setattr(ram_module, "CHUNK", 1000)  # 4773 entries: 5 blocks, the last one short
    assert torch.equal(call(method, experts, base, **params), whole)


def test_ram_keeps_unique_entries_and_averages_shared_ones():
    # touched (|τ| > 1e-5) by: (first), (third), (first, second), none
    out = call("ram", RAM_EXPERTS, torch.zeros(4))
    assert torch.allclose(out, tv(1, -3, 3, 0))


def test_ramplus_scales_unique_entries_by_the_shared_to_unique_ratio():
    # first: 1 unique, 1 shared: ρ = 1, λ = 1 + 0.5·min(1, 0.4) = 1.2; third: ρ = 0, λ = 1
    out = call("ramplus_tl", RAM_EXPERTS, torch.zeros(4), r=0.5, alpha=0.4)
    assert torch.allclose(out, tv(1.2, -3, 3, 0))
    assert torch.allclose(call("ramplus_tl", RAM_EXPERTS, torch.zeros(4), r=0.0), call("ram", RAM_EXPERTS,
                                                                                         torch.zeros(4)))


# -- passthrough and properties ----------------------------------------------------------------------
def test_passthrough_scale_one_is_the_identity_and_scale_multiplies():
    tensor = torch.randn(5, 3)
    assert torch.equal(call("passthrough", [tensor], None), tensor)
    assert torch.equal(call("passthrough", [tensor], None, scale=[0.5]), tensor * 0.5)


@pytest.mark.parametrize("name, params", [
    ("breadcrumbs", {"weight": [1.0, 0.5, 2.0], "density": [0.4, 0.5, 0.6], "gamma": [0.05, 0.1, 0.0]}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.5, 2.0], "density": [0.4, 0.5, 0.6], "gamma": [0.05, 0.1, 0.0]}),
    ("sce", {"select_topk": 0.5}),
    ("ram", {}),
    ("ramplus_tl", {"r": 0.5, "alpha": 1.0}),
])
def test_the_order_of_the_experts_does_not_change_the_result(name, params):
    torch.manual_seed(2)
    base = torch.randn(12, 10)
    experts = [base + torch.randn(12, 10) * (torch.rand(12, 10) < 0.5) for _ in range(3)]
    order = [2, 0, 1]
    permuted = {k: [v[i] for i in order] if isinstance(v, list) else v for k, v in params.items()}
    assert torch.allclose(call(name, experts, base, **params), call(name, [experts[i] for i in order], base,
                                                                        **permuted), atol=1e-6)


# -- mergekit's counts and defaults -------------------------------------------------------------------
def test_top_k_keeps_int_of_density_times_numel():
    values = torch.arange(1.0, 8.0)  # 7 entries: 0.5·7 = 3.5 keeps 3 (round() would keep 4)
    assert int(magnitude_mask(values, 0.5).sum()) == 3


def test_keep_ties_false_keeps_exactly_k_entries():
    tied = tv(1, 2, 2, 2, 3)
    assert int(magnitude_mask(tied, 0.4).sum()) == 4  # the 2s tie at the threshold: all kept
    assert torch.equal(magnitude_mask(tied, 0.4, keep_ties=False), tv(0, 1, 0, 0, 1).bool())  # first in storage


def test_ties_without_density_trims_nothing_as_in_mergekit():
    base = torch.zeros(6)
    experts = [torch.randn(6), torch.randn(6)]
    assert torch.equal(call("ties", experts, base, weight=[1.0, 1.0]),
                       call("ties", experts, base, weight=[1.0, 1.0], density=[1.0, 1.0]))


def test_rescale_on_ties_restores_each_trimmed_task_vector_l1_norm():
    out = call("ties", [RAMP], torch.zeros(10), weight=[1.0], density=[0.3], rescale=True)
    # top 3 (|τ| 8, 9, 10; L1 27) scaled to the whole task vector's L1 of 55
    assert torch.allclose(out, tv(0, 0, 0, 0, 0, 0, 0, -8, 9, -10) * 55 / 27)


def test_gradients_take_their_first_value_outside_the_layers():
    assert layer_position("model.norm.weight", 4) == 0.0
    assert layer_position("lm_head.weight", 4) == 0.0
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # one layer: mergekit's t = 1
    filtered = load_config("merge_method: linear\nmodels: [{model: a}]\nparameters:\n"
                           "  weight: [{filter: '*', value: 0.3}]\n").parameters["weight"]
    assert evaluate_setting(filtered, "anything", 0.0) == 0.3


# -- end to end ---------------------------------------------------------------------------------------
def end_to_end_config(method: str, world: dict[str, str]) -> dict:
    experts = [{"model": world[name]} for name in "abc"]
    configs = {
        "breadcrumbs": {"weight": 1.0, "density": 0.5, "gamma": 0.05},
        "breadcrumbs_ties": {"weight": 1.0, "density": 0.5, "gamma": 0.05},
        "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
        "della_linear": {"weight": 1.0, "density": 0.5, "epsilon": 0.1, "lambda": 0.5},
        "sce": {"select_topk": 0.5},
        "ram": {"epsilon": 1e-3},
        "ramplus_tl": {"epsilon": 1e-3},
    }
    if method == "passthrough":
        return {"merge_method": "passthrough", "models": [{"model": world["a"], "parameters": {
            "scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]}
    return {"merge_method": method, "base_model": world["base"], "models": experts, "parameters": configs[method]}


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram",
                                    "ramplus_tl", "passthrough"])
def test_end_to_end_merge_matches_the_method_and_loads_with_transformers(world, tmp_path, method):
    config = end_to_end_config(method, world)
    out = mergelab.merge(config, tmp_path / "out", quiet=True, seed=4)
    merged = state(out)
    plan = mergelab.engine.plan_merge(config, tmp_path / "unused", mergelab.config.MergeOptions())
    try:
        for job in plan.jobs:
            if job.params is None:
                continue
            tensors = [s.reader.get(job.name).float() for s in plan.experts]
            base = plan.base.reader.get(job.name).float() if plan.base else None
            extra = {"seed": 4, "key": job.name} if plan.method.uses_seed else {}
            expected = plan.method(tensors, base, **job.params, **extra)
            assert torch.allclose(merged[job.name].float(), expected, atol=1e-6), job.name
    finally:
        plan.close()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()
    if method == "passthrough":
        a = state(world["a"])
        assert not merged["model.layers.0.self_attn.o_proj.weight"].any()
        assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


def test_della_merges_the_same_for_any_thread_count(world, tmp_path):
    config = end_to_end_config("della", world)
    one = mergelab.merge(config, tmp_path / "one", quiet=True, seed=7)
    three = mergelab.merge(config, tmp_path / "three", quiet=True, seed=7, threads=3)
    assert (one / "model.safetensors").read_bytes() == (three / "model.safetensors").read_bytes()


def test_weight_is_required_with_an_error_that_names_the_model(world, tmp_path):
    config = {"merge_method": "ties", "base_model": world["base"],
              "models": [{"model": world["a"], "parameters": {"weight": 1.0}}, {"model": world["b"]}]}
    with pytest.raises(mergelab.MergelabError, match=r"ties needs parameter 'weight' for model '.*/b' .*set it"):
        mergelab.merge(config, tmp_path / "out", quiet=True)


def test_deliberate_differences_from_mergekit_warn_once_at_plan_time(world, tmp_path, caplog):
    config = {"merge_method": "dare_ties", "base_model": world["base"], "models": [{"model": world["a"]}],
              "parameters": {"weight": 1.0, "density": 0.5}}
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        mergelab.merge(config, tmp_path / "out", quiet=True)
    notes = [r.getMessage() for r in caplog.records if "differs from mergekit" in r.getMessage()]
    assert len(notes) == 1 and "rescale_l1: true" in notes[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        mergelab.merge({**config, "parameters": {"weight": 1.0, "density": 0.5, "rescale_l1": True}},
                       tmp_path / "l1", quiet=True)
    assert not [r for r in caplog.records if "differs from mergekit" in r.getMessage()]


def test_slerp_needs_t_as_in_mergekit(world, tmp_path):
    config = {"merge_method": "slerp", "base_model": world["a"], "models": [{"model": world["b"]}]}
    with pytest.raises(mergelab.MergelabError, match=r"slerp needs parameter 't' .*set it under the top-level"):
        mergelab.merge(config, tmp_path / "out", quiet=True)
