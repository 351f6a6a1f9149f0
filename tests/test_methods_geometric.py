"""mergekit's geometric methods (nuslerp, multislerp, karcher, nearswap, arcee_fusion): hand-computed
cases from their documented formulas, properties, and end-to-end merges loaded back with transformers."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import mergelab
from mergelab import MergelabError
from mergelab.io import CheckpointReader
from mergelab.methods import METHODS, PRESETS, sphere
from mergelab.methods.arcee_fusion import arcee_fusion_notes

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ROOT2 = math.sqrt(0.5)


def call(name, tensors, base=None, **params):
    """Call a method on clones (methods may overwrite their inputs)."""
    return METHODS[name]([t.clone() for t in tensors], None if base is None else base.clone(), **params)


def tv(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(a, b, atol=1e-6):
    return torch.allclose(a, b, atol=atol, rtol=1e-5)


# -- nuslerp -------------------------------------------------------------------------------------
def test_nuslerp_takes_t_from_the_weights():
    a, b = tv(1, 0), tv(0, 1)
    assert close(call("nuslerp", [a, b], weight=[1, 1]), tv(ROOT2, ROOT2))
    # t = w_2 / (w_1 + w_2) = 1/4 of the right angle from a
    assert close(call("nuslerp", [a, b], weight=[3, 1]), tv(math.cos(math.pi / 8), math.sin(math.pi / 8)))
    assert close(call("nuslerp", [a, b], weight=[1, 0]), a) and close(call("nuslerp", [a, b], weight=[0, 2]), b)


def test_nuslerp_weights_summing_to_zero_mean_halfway():
    a, b = tv(1, 0), tv(0, 1)
    assert close(call("nuslerp", [a, b], weight=[1, -1]), call("nuslerp", [a, b], weight=[1, 1]))


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_nuslerp_with_weights_one_minus_t_and_t_is_slerp(t):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    assert close(call("nuslerp", [a, b], weight=[1 - t, t]), call("slerp", [b], a, t=t), atol=1e-5)


def test_nuslerp_with_a_base_interpolates_the_task_vectors():
    base = tv(1, 1)
    merged = call("nuslerp", [tv(2, 1), tv(1, 2)], base, weight=[1, 1])  # task vectors (1, 0) and (0, 1)
    assert close(merged, tv(1 + ROOT2, 1 + ROOT2))


def test_nuslerp_flatten_rows_and_columns_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # flattened: cos θ = −1/2, θ = 2π/3, and at t = 1/2 both scales are sin(π/3)/sin(2π/3) = 1
    assert close(call("nuslerp", [a, b], weight=[1, 1]), a + b)
    # rows (slices along the last dimension): a right angle, and an antipodal pair (linear)
    rows = call("nuslerp", [a, b], weight=[1, 1], nuslerp_flatten=False)
    assert close(rows, torch.tensor([[ROOT2, ROOT2], [0.0, 0.0]]))
    # columns: (1, 1) vs (0, −1) at θ = 3π/4; a zero column vs (1, 0) at cos θ = 0 (norms clamped)
    columns = call("nuslerp", [a, b], weight=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=True)
    scale = math.sin(3 * math.pi / 8) / math.sin(3 * math.pi / 4)
    assert close(columns, torch.tensor([[scale, ROOT2], [0.0, 0.0]]))


def test_nuslerp_keeps_the_norm_of_equal_norm_endpoints():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    a, b = a / a.norm(), b / b.norm()
    for weights in ([1, 3], [2, 1]):
        assert abs(float(call("nuslerp", [a, b], weight=weights).norm()) - 1.0) < 1e-5


# -- multislerp ----------------------------------------------------------------------------------
def test_multislerp_hand_computed():
    # directions (1, 0) and (0, 1), norms 1 and 3
    a, b = tv(1, 0), tv(0, 3)
    assert close(call("multislerp", [a, b], weight=[1, 1]), tv(ROOT2, ROOT2) * 2)  # mean norm (1 + 3)/2
    # weights 3:1 -> mean direction (3, 1)/√10, mean norm 0.75·1 + 0.25·3
    assert close(call("multislerp", [a, b], weight=[3, 1]), tv(3, 1) / math.sqrt(10) * 1.5)
    # without normalize_weights the norms add up with the raw weights: 1·2 + 1·2
    assert close(call("multislerp", [tv(2, 0), tv(0, 2)], weight=[1, 1], normalize_weights=False),
                 tv(ROOT2, ROOT2) * 4)


def test_multislerp_of_two_equal_norm_models_at_equal_weights_is_slerp_halfway():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
    b = b * (a.norm() / b.norm())
    assert close(call("multislerp", [a, b], weight=[1, 1]), call("slerp", [b], a, t=0.5), atol=1e-5)


def test_multislerp_with_a_base_works_on_task_vectors():
    base = tv(5, 5, 5)
    assert close(call("multislerp", [tv(6, 5, 5), tv(5, 6, 5), tv(5, 5, 6)], base, weight=[1, 1, 1]),
                 base + torch.full((3,), 1 / math.sqrt(3)))


def test_multislerp_of_identical_models_is_that_model():
    x = torch.randn(4, 4)
    assert close(call("multislerp", [x, x, x], weight=[1, 2, 3]), x, atol=1e-5)


def test_multislerp_antipodal_models_fall_back_to_linear_for_two_and_fail_for_three():
    a = tv(1, 2)
    assert close(call("multislerp", [a, -2 * a], weight=[1, 1]), tv(-0.5, -1))  # (a − 2a)/2
    with pytest.raises(MergelabError, match="directions is zero"):
        call("multislerp", [a, -a, tv(0, 0)], weight=[1, 1, 1])
    # tensors no model changed from the base merge to the base (mergekit refuses this case)
    assert close(call("multislerp", [tv(1, 1)] * 3, tv(1, 1), weight=[1, 1, 1]), tv(1, 1))


def test_multislerp_weights_summing_to_zero_are_refused_at_plan_time():
    check = METHODS["multislerp"].check
    assert "sum to zero" in check({"weight": [1, -1], "normalize_weights": True, "eps": 1e-8}, "for tensor 'x'")
    assert check({"weight": [1, -1], "normalize_weights": False, "eps": 1e-8}, "for tensor 'x'") is None


# -- karcher -------------------------------------------------------------------------------------
def test_karcher_hand_computed():
    # two directions at a right angle: the midpoint of the arc, scaled by the mean norm (2 + 4)/2
    assert close(call("karcher", [tv(2, 0), tv(0, 4)]), tv(ROOT2, ROOT2) * 3)
    # three orthogonal directions of norm 1: the centre of the octant
    eye = torch.eye(3)
    assert close(call("karcher", list(eye)), torch.full((3,), 1 / math.sqrt(3)))
    # a zero tensor has no direction but counts in the mean norm: (3 + 3 + 0)/3
    assert close(call("karcher", [tv(3, 0), tv(0, 3), tv(0, 0)]), tv(ROOT2, ROOT2) * 2)
    assert close(call("karcher", [tv(0, 0), tv(0, 0)]), tv(0, 0))


def test_karcher_of_identical_models_is_that_model():
    x = torch.randn(5, 7)
    assert close(call("karcher", [x, x, x]), x, atol=1e-5)


def test_karcher_of_two_equal_norm_models_is_slerp_halfway():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, generator=generator), torch.randn(30, generator=generator)
    b = b * (a.norm() / b.norm())
    assert close(call("karcher", [a, b]), call("slerp", [b], a, t=0.5), atol=1e-5)


def test_karcher_result_is_a_critical_point_of_the_squared_angles():
    """At the Karcher mean u the log maps of the directions cancel: Σ θ_i/sin θ_i (u_i − cos θ_i u) = 0."""
    generator = torch.Generator().manual_seed(4)
    tensors = [torch.randn(50, generator=generator, dtype=torch.float64) + 1.0 for _ in range(5)]
    merged = call("karcher", tensors, max_iter=200, tol=1e-12)
    u = merged / merged.norm()
    residual = torch.zeros_like(u)
    for tensor in tensors:
        unit = tensor / tensor.norm()
        cosine = float(unit @ u)
        angle = math.acos(cosine)
        residual += angle / math.sin(angle) * (unit - cosine * u)
    assert float(residual.norm()) < 1e-9
    assert abs(float(merged.norm()) - sum(float(t.norm()) for t in tensors) / 5) < 1e-9
    # ten steps (the default) already land within float32 precision of it here
    assert close(call("karcher", tensors).float(), merged.float(), atol=1e-5)


def test_karcher_max_iter_must_be_a_whole_number():
    check = METHODS["karcher"].check
    assert "whole number" in check({"max_iter": 2.5, "tol": 1e-5}, "for tensor 'x'")
    assert check({"max_iter": 3.0, "tol": 1e-5}, "for tensor 'x'") is None


# -- nearswap ------------------------------------------------------------------------------------
def test_nearswap_hand_computed():
    base, other = tv(0, 0, 0, 1), tv(0.05, 0.2, -1, 1)
    # |Δ| = 0.05 ≤ t: swapped; 0.2 and 1: moved by t toward the other; equal entries stay
    assert close(call("nearswap", [other], base, t=0.1), tv(0.05, 0.1, -0.1, 1))


def test_nearswap_t_zero_is_the_base_and_a_large_t_the_other_model():
    base, other = torch.randn(6, 6), torch.randn(6, 6)
    assert torch.equal(call("nearswap", [other], base, t=0.0), base)
    assert close(call("nearswap", [other], base, t=1e6), other)


def test_nearswap_t_is_required():
    with pytest.raises(TypeError, match="needs t"):
        METHODS["nearswap"]([tv(1)], tv(0))


# -- arcee_fusion --------------------------------------------------------------------------------
def test_arcee_fusion_takes_the_outliers_of_one_row():
    base = torch.zeros(1, 8)
    other = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 3.0]])
    # importance = |Δ|·KL (one row: one KL > 0); quartiles at sorted positions ⌊q·7⌋ = 1, 3, 5:
    # threshold 0.4 + 1.5·(0.6 − 0.2) = 1.0 (times KL), met by 3.0 only
    assert close(call("arcee_fusion", [other], base), torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3.0]]))


def test_arcee_fusion_weighs_changes_by_the_kl_divergence_of_their_row():
    base = torch.zeros(2, 8)
    other = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 3.0], [5.0] * 8])
    # row 1 is shifted by a constant: the same softmax, KL 0, importance 0 however large the change.
    # Sorted importance: eight zeros, then row 0's; positions ⌊q·15⌋ = 3, 7, 11 give 0, 0, 0.4·KL,
    # so the threshold is 0.6·KL: row 0 keeps 0.6, 0.7, 3.0 and row 1 keeps nothing
    expected = torch.tensor([[0, 0, 0, 0, 0, 0.6, 0.7, 3.0], [0.0] * 8])
    assert close(call("arcee_fusion", [other], base), expected)


def test_arcee_fusion_takes_each_entry_from_one_model_or_the_other():
    base, other = torch.randn(16, 32), torch.randn(16, 32)
    merged = call("arcee_fusion", [other], base)
    taken = merged != base  # base + (θ_1 − θ_b) is θ_1 up to rounding
    assert close(merged[taken], other[taken]) and 0 < int(taken.sum()) < merged.numel()
    assert torch.equal(call("arcee_fusion", [base], base), base)


def test_arcee_fusion_quartiles_of_large_tensors_are_the_exact_sorted_values():
    from mergelab.methods.arcee_fusion import _sorted_value

    generator = torch.Generator().manual_seed(6)
    importance = torch.rand(200_003, generator=generator).square_()  # past the histogram threshold
    importance[:1000] = 0.0  # ties at zero
    ordered = importance.sort().values
    for index in (0, 50_000, 100_001, 150_001, 200_002):
        assert _sorted_value(importance, index) == float(ordered[index])
    shifted = importance + 1.0  # the smallest value is not 0
    assert _sorted_value(shifted, 0) == float(ordered[0] + 1.0)
    signed = importance.clone()
    signed[7] = -0.0  # a sign bit (-0.0 sorts as 0): the exact fallback
    assert _sorted_value(signed, 50_000) == float(ordered[50_000])


def test_arcee_fusion_notes_the_sampled_quartiles_of_large_tensors():
    assert arcee_fusion_notes({}, 1_000_000) == []
    assert "1M randomly sampled" in arcee_fusion_notes({}, 1_000_001)[0]


# -- shared --------------------------------------------------------------------------------------
def test_whole_tensor_dot_and_norm_are_accurate_where_float32_sums_are_not():
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(3_000_001, generator=generator)
    b = a + 0.1 * torch.randn(3_000_001, generator=generator)
    exact = float(a.double() @ b.double())
    assert abs(sphere.dot(a, b) - exact) < 1e-7 * abs(exact)  # float32 resolution
    assert abs(sphere.norm(a) - float(a.double().norm())) < 1e-7 * float(a.double().norm())


GEOMETRIC = ("nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion")


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_methods_do_not_modify_the_base_tensor(name):
    base = torch.randn(4, 6)
    kept = base.clone()
    method = METHODS[name]
    count = 1 if method.max_models == 1 else 2
    params = {**method.defaults(count), **({"weight": [1.0] * count} if method.param("weight") else {}),
              **({"t": 0.1} if name == "nearswap" else {})}
    method([base + torch.randn(4, 6) for _ in range(count)], base if (method.uses_base or method.optional_base)
           else None, **params)
    assert torch.equal(base, kept)


# -- end to end ----------------------------------------------------------------------------------
def state(path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader.tensors}


# method: (config with model names, experts, base, the method's full parameters)
CASES = {
    "nuslerp": ({"merge_method": "nuslerp", "models": [("a", {"weight": 0.7}), ("b", {"weight": 0.3})],
                 "parameters": {"nuslerp_flatten": False}},
                ["a", "b"], None, {"weight": [0.7, 0.3], "nuslerp_flatten": False, "nuslerp_row_wise": False}),
    "nuslerp_base": ({"merge_method": "nuslerp", "base_model": "base",
                      "models": [("a", {"weight": 1.0}), ("b", {"weight": 2.0})]},
                     ["a", "b"], "base", {"weight": [1.0, 2.0], "nuslerp_flatten": True, "nuslerp_row_wise": False}),
    "multislerp": ({"merge_method": "multislerp", "base_model": "base",
                    "models": [("a", {"weight": 1.0}), ("b", {"weight": 0.5}), ("c", {"weight": 0.5})]},
                   ["a", "b", "c"], "base", {"weight": [1.0, 0.5, 0.5], "normalize_weights": True, "eps": 1e-8}),
    "karcher": ({"merge_method": "karcher", "models": [("a", {}), ("b", {}), ("c", {})],
                 "parameters": {"max_iter": 20}}, ["a", "b", "c"], None, {"max_iter": 20, "tol": 1e-5}),
    "nearswap": ({"merge_method": "nearswap", "base_model": "base", "models": [("a", {})],
                  "parameters": {"t": 0.01}}, ["a"], "base", {"t": 0.01}),
    "arcee_fusion": ({"merge_method": "arcee_fusion", "base_model": "base", "models": [("a", {})]},
                     ["a"], "base", {}),
}


def materialize(config, world):
    config = dict(config)
    config["models"] = [{"model": world[m], "parameters": p} for m, p in config["models"]]
    if "base_model" in config:
        config["base_model"] = world[config["base_model"]]
    return config


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_the_method_on_whole_state_dicts_and_loads(case, world, tmp_path, one_thread):
    config, experts, base, params = CASES[case]
    out = mergelab.merge(materialize(config, world), tmp_path / "out", quiet=True)
    merged = state(out)
    states = [state(world[e]) for e in experts]
    base_state = state(world[base]) if base else None
    assert set(merged) == set(states[0])
    for name, tensor in merged.items():
        expected = METHODS[config["merge_method"]]([s[name].float() for s in states],
                                                   base_state[name].float() if base else None, **params)
        assert torch.allclose(tensor.float(), expected, atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()


def test_the_optional_base_is_never_one_of_the_merged_models(world, tmp_path):
    models = [{"model": world[m], "parameters": {"weight": 1.0}} for m in ("base", "a", "b")]
    # multislerp (as mergekit): a base_model listed under models is the base, not a third model
    out = mergelab.merge({"merge_method": "multislerp", "base_model": world["base"], "models": models},
                         tmp_path / "multi", quiet=True)
    alone = mergelab.merge({"merge_method": "multislerp", "base_model": world["base"], "models": models[1:]},
                           tmp_path / "alone", quiet=True)
    assert all(torch.equal(state(out)[n], t) for n, t in state(alone).items())
    # nuslerp merges exactly two models besides the base
    with pytest.raises(MergelabError, match=r"nuslerp merges exactly 2 models \(base_model, if given, is not one of them\); got 1"):
        mergelab.merge({"merge_method": "nuslerp", "base_model": world["base"], "models": models[:2]},
                       tmp_path / "nu", quiet=True)


def test_required_parameters_are_refused_before_merging_as_mergekit_does(world, tmp_path):
    for method in ("nuslerp", "multislerp"):
        with pytest.raises(MergelabError, match="needs parameter 'weight'"):
            mergelab.merge({"merge_method": method, "models": [{"model": world["a"]}, {"model": world["b"]}]},
                           tmp_path / method, quiet=True)
    with pytest.raises(MergelabError, match="nearswap needs parameter 't'"):
        mergelab.merge({"merge_method": "nearswap", "base_model": world["base"], "models": [{"model": world["a"]}]},
                       tmp_path / "nearswap", quiet=True)
    assert not list(tmp_path.iterdir())


def test_methods_command_prints_each_method_with_its_parameters_defaults_and_paper():
    from click.testing import CliRunner

    from mergelab.cli import main

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    listing, presets = result.output.split("\npresets", 1)
    blocks = {block.split()[0]: block for block in re.split(r"\n(?=\S)", listing.strip())}
    assert set(blocks) == set(METHODS)
    for name, preset in PRESETS.items():  # each paper setting, with its method and values for 4 models
        assert f"{name:22} {preset.method}: " in presets and preset.source in presets
    assert "ties-paper             ties: density=0.2, lambda=1 (for 4 models)" in presets
    assert "task_arithmetic: lambda=0.25 (for 4 models)" in presets
    for name, method in METHODS.items():
        assert f"paper: {method.paper}" in blocks[name]
    assert "weight=required*, nuslerp_flatten=True, nuslerp_row_wise=False" in blocks["nuslerp"]
    assert "exactly 2; base_model optional" in blocks["nuslerp"]
    assert "max_iter=10, tol=1e-05" in blocks["karcher"] and "t=required" in blocks["nearswap"]
    assert "params: none" in blocks["arcee_fusion"] and "base_model + exactly 1 other" in blocks["arcee_fusion"]


# -- the README ----------------------------------------------------------------------------------
MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                    "della", "della_linear", "sce", "slerp", "nuslerp", "multislerp", "karcher", "nearswap",
                    "arcee_fusion", "model_stock", "passthrough", "ram", "ramplus_tl"}


def test_readme_compatibility_table_names_every_method_of_the_registry_and_of_mergekit():
    section = README.split("### Compatibility with mergekit", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (same|differs|refused|mergelab only)\b", section, flags=re.MULTILINE)
    named = {name for name, _ in rows}
    assert set(METHODS) <= named and MERGEKIT_METHODS <= named
    for key in ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
                "tokenizer", "chat_template", "modules", "slices"):
        assert key in named, key
