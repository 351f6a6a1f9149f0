"""End-to-end merges of tiny transformers checkpoints, loaded back with transformers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergelab
from mergelab.io import CheckpointReader
from mergelab.methods import METHODS

from conftest import save_model
from mergelab.lm import tiny_llama


def state(path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as reader:
        return {name: reader.get(name) for name in reader.tensors}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def runs(model) -> bool:
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    return bool(torch.isfinite(logits).all())


def expected_merge(method, world, experts, base, **params):
    """Apply the pure method tensor by tensor to full state dicts: the reference result."""
    states = [state(world[e]) for e in experts]
    base_state = state(world[base]) if base else None
    out = {}
    for name in states[0]:
        tensors = [s[name].float() for s in states]
        extra = {"seed": 0, "key": name} if METHODS[method].uses_seed else {}
        out[name] = METHODS[method](tensors, base_state[name].float() if base_state else None, **params, **extra)
    return out


CASES = {
    "linear": ({"merge_method": "linear", "models": ["a", "b", "c"], "parameters": {"weight": 1}},
               ["a", "b", "c"], None,
               {"weight": [1, 1, 1], "normalize": True}),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": "base", "models": ["a", "b"],
                         "parameters": {"weight": 1, "lambda": 0.5}}, ["a", "b"], "base",
                        {"weight": [1, 1], "lambda": 0.5, "normalize": False}),
    "ties": ({"merge_method": "ties", "base_model": "base", "models": ["a", "b", "c"],
              "parameters": {"weight": 1, "density": 0.3}}, ["a", "b", "c"], "base",
             {"weight": [1] * 3, "density": [0.3] * 3, "lambda": 1.0, "normalize": True}),
    "dare_ties": ({"merge_method": "dare_ties", "base_model": "base", "models": ["a", "b", "c"],
                   "parameters": {"weight": 1, "density": 0.4}}, ["a", "b", "c"], "base",
                  {"weight": [1] * 3, "density": [0.4] * 3, "lambda": 1.0, "normalize": False, "rescale": True}),
    "dare_linear": ({"merge_method": "dare_linear", "base_model": "base", "models": ["a", "b"],
                     "parameters": {"weight": 1, "density": 0.6, "lambda": 0.8}}, ["a", "b"], "base",
                    {"weight": [1, 1], "density": [0.6, 0.6], "lambda": 0.8, "normalize": False, "rescale": True}),
    "slerp": ({"merge_method": "slerp", "base_model": "a", "models": ["b"], "parameters": {"t": 0.3}},
              ["b"], "a", {"t": 0.3}),
    "model_stock": ({"merge_method": "model_stock", "base_model": "base", "models": ["a", "b", "c"]},
                    ["a", "b", "c"], "base", {"filter_wise": False}),
    "lm_cocktail": ({"merge_method": "lm_cocktail", "models": ["a", "base", "b"], "parameters": {"alpha": 0.6}},
                    ["a", "base", "b"], None, {"weight": [1, 1, 1], "alpha": 0.6}),
}


def materialize(config, world):
    config = dict(config)
    config["models"] = [{"model": world[m]} for m in config["models"]]
    if "base_model" in config:
        config["base_model"] = world[config["base_model"]]
    return config


@pytest.mark.parametrize("method", list(CASES))
def test_merge_matches_the_method_applied_to_whole_state_dicts(method, world, tmp_path):
    config, experts, base, params = CASES[method]
    out = mergelab.merge(materialize(config, world), tmp_path / "out", quiet=True)
    merged = state(out)
    expected = expected_merge(method, world, experts, base, **params)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name].float(), tensor, atol=1e-6), name
    assert runs(load(out))


def test_tied_embeddings_round_trip(world, tmp_path):
    out = mergelab.merge({"merge_method": "linear",
                          "parameters": {"weight": 1.0}, "models": [{"model": world["a"]}, {"model": world["b"]}]},
                         tmp_path / "out", quiet=True)
    assert "lm_head.weight" not in CheckpointReader(out).tensors
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    average = (state(world["a"])["model.embed_tokens.weight"] + state(world["b"])["model.embed_tokens.weight"]) / 2
    assert torch.allclose(model.lm_head.weight, average, atol=1e-6)


def test_untied_lm_head_is_merged_on_its_own(tmp_path):
    paths = [save_model(tiny_llama(seed=s, tie=False), tmp_path / f"m{s}") for s in (1, 2)]
    out = mergelab.merge({"merge_method": "linear",
                          "parameters": {"weight": 1.0}, "models": [{"model": str(p)} for p in paths]},
                         tmp_path / "out", quiet=True)
    merged, first, second = state(out), state(paths[0]), state(paths[1])
    assert torch.allclose(merged["lm_head.weight"], (first["lm_head.weight"] + second["lm_head.weight"]) / 2)
    assert runs(load(out))


def test_output_dtype_shards_tokenizer_and_config(world, tmp_path):
    config = {"merge_method": "linear",
              "parameters": {"weight": 1.0}, "models": [{"model": world["a"]}, {"model": world["c"]}],
              "out_dtype": "bfloat16"}
    out = mergelab.merge(config, tmp_path / "out", quiet=True, shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in state(out).values())
    assert yaml.safe_load((out / "mergelab_config.yml").read_text())["merge_method"] == "linear"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("copy 1 2 =")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_threads_and_order_do_not_change_a_dare_merge(world, tmp_path):
    config = materialize(CASES["dare_ties"][0], world)
    one = mergelab.merge(config, tmp_path / "one", quiet=True, seed=7)
    four = mergelab.merge(config, tmp_path / "four", quiet=True, seed=7, threads=4)
    other_seed = mergelab.merge(config, tmp_path / "other", quiet=True, seed=8)
    assert (one / "model.safetensors").read_bytes() == (four / "model.safetensors").read_bytes()
    assert (one / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()


def test_bin_checkpoints_merge_like_safetensors(world, tmp_path):
    model = load(world["a"])
    save_model(model, tmp_path / "a_bin", safe=False)
    config = {"merge_method": "linear",
              "parameters": {"weight": 1.0}, "models": [{"model": str(tmp_path / "a_bin")}, {"model": world["b"]}]}
    from_bin = state(mergelab.merge(config, tmp_path / "x", quiet=True))
    config["models"][0]["model"] = world["a"]
    from_safe = state(mergelab.merge(config, tmp_path / "y", quiet=True))
    for name in from_safe:
        assert torch.allclose(from_bin[name], from_safe[name])


def test_filtered_and_gradient_parameters_are_applied_per_tensor(world, tmp_path):
    config = {"merge_method": "slerp", "base_model": world["a"], "models": [{"model": world["b"]}],
              "parameters": {"t": [{"filter": "self_attn", "value": 0.0}, {"value": [0.0, 1.0]}]}}
    merged = state(mergelab.merge(config, tmp_path / "out", quiet=True))
    a, b = state(world["a"]), state(world["b"])
    assert torch.equal(merged["model.layers.1.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    assert torch.allclose(merged["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(merged["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"],
                          atol=1e-6)
    # outside the layers a gradient takes its first value, as in mergekit 0.1.x: t = 0 gives model a
    assert torch.allclose(merged["model.norm.weight"], a["model.norm.weight"], atol=1e-6)


def test_per_model_parameters_override_global_ones(world, tmp_path):
    config = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "models": [{"model": world["a"], "parameters": {"weight": 3.0}}, {"model": world["b"]}]}
    merged = state(mergelab.merge(config, tmp_path / "out", quiet=True))
    a, b = state(world["a"]), state(world["b"])
    name = "model.norm.weight"
    assert torch.allclose(merged[name], (3 * a[name] + b[name]) / 4, atol=1e-6)


def test_yaml_file_with_paths_relative_to_it(tiny_world, tmp_path):
    config_path = tiny_world["base"].parent / "rel.yml"
    config_path.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n  - model: b\n"
                           "parameters:\n  weight: 1.0\n  lambda: 0.5\ndtype: float32\n")
    out = mergelab.merge(config_path, tmp_path / "out", quiet=True)
    assert runs(load(out))


def test_base_model_listed_among_models_is_not_its_own_expert(world, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": world["base"], "parameters": {"weight": 1.0},
              "models": [{"model": world["base"]}, {"model": world["a"]}]}
    merged = state(mergelab.merge(config, tmp_path / "out", quiet=True))
    a = state(world["a"])
    assert torch.allclose(merged["model.norm.weight"], a["model.norm.weight"], atol=1e-6)


def test_tokenizer_source_is_copied(world, tiny_world, tmp_path):
    config = {"merge_method": "linear",
              "parameters": {"weight": 1.0}, "models": [{"model": world["a"]}, {"model": world["b"]}],
              "tokenizer_source": world["b"]}
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    assert (out / "tokenizer.json").read_text() == (tiny_world["b"] / "tokenizer.json").read_text()


def test_integer_buffers_are_copied(tmp_path, world):
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        save_file({"w": state(world[name])["model.norm.weight"], "steps": torch.tensor([3, 4])},
                  directory / "model.safetensors")
    config = {"merge_method": "linear",
              "parameters": {"weight": 1.0}, "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}]}
    merged = load_file(mergelab.merge(config, tmp_path / "out", quiet=True) / "model.safetensors")
    assert torch.equal(merged["steps"], torch.tensor([3, 4]))


def test_fisher_merge_end_to_end(world, tmp_path):
    from mergelab.fisher import estimate_fisher

    texts = ["copy 1 2 3 = 1 2 3", "sort 3 1 2 = 1 2 3", "reverse 1 2 = 2 1"]
    fishers = [estimate_fisher(world[m], texts, tmp_path / f"{m}.safetensors") for m in ("a", "b")]
    config = {"merge_method": "fisher",
              "models": [{"model": world[m], "parameters": {"fisher": str(f)}} for m, f in zip("ab", fishers)]}
    merged = state(mergelab.merge(config, tmp_path / "out", quiet=True))
    a, b = state(world["a"]), state(world["b"])
    fa, fb = load_file(fishers[0]), load_file(fishers[1])
    name = "model.layers.0.mlp.up_proj.weight"
    expected = ((fa[name] + 1e-8) * a[name] + (fb[name] + 1e-8) * b[name]) / (fa[name] + fb[name] + 2e-8)
    assert torch.allclose(merged[name], expected, atol=1e-5)
    assert runs(load(tmp_path / "out"))


def test_legacy_position_ids_buffers_do_not_block_a_merge(tmp_path, world):
    """Older transformers saved the rebuilt position_ids buffer; newer ones don't."""
    a, b = state(world["a"]), state(world["b"])
    (tmp_path / "old").mkdir()
    save_file({**a, "model.position_ids": torch.arange(8)[None]}, tmp_path / "old" / "model.safetensors")
    (tmp_path / "new").mkdir()
    save_file(b, tmp_path / "new" / "model.safetensors")
    config = {"merge_method": "linear",
              "parameters": {"weight": 1.0},
              "models": [{"model": str(tmp_path / "old")}, {"model": str(tmp_path / "new")}]}
    merged = load_file(mergelab.merge(config, tmp_path / "out", quiet=True) / "model.safetensors")
    assert "model.position_ids" not in merged
    assert torch.allclose(merged["model.norm.weight"], (a["model.norm.weight"] + b["model.norm.weight"]) / 2)


def test_overflow_into_the_output_dtype_is_reported(world, tmp_path):
    import pytest

    from mergelab import MergelabError

    config = {"merge_method": "linear", "out_dtype": "float16", "parameters": {"normalize": False, "weight": 1.0},
              "models": [{"model": world["a"], "parameters": {"weight": 1e6}}, {"model": world["b"]}]}
    with pytest.raises(MergelabError, match="from finite inputs .*overflow float16"):
        mergelab.merge(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


# -- the engine reads behaviour from the registry, never from a method's name ----------------------
def _lerp(tensors, base, *, t):
    return torch.lerp(base, tensors[0], t)


def _masked_sum(tensors, base, *, keep):
    return sum(k * tensor for k, tensor in zip(keep, tensors))


def test_a_method_with_the_first_model_as_base_needs_only_its_registry_entry(world, tmp_path, monkeypatch):
    from mergelab.methods import MergeMethod, Param

    monkeypatch.setitem(METHODS, "toy_lerp", MergeMethod(
        "toy_lerp", _lerp, (Param("t", 0.25, low=0.0, high=1.0),), "test", uses_base=True,
        first_model_is_base=True, min_models=1, max_models=1, summary="θ_b + t (θ_1 − θ_b)"))
    config = {"merge_method": "toy_lerp", "models": [{"model": world["a"]}, {"model": world["b"]}]}
    merged, a, b = state(mergelab.merge(config, tmp_path / "out", quiet=True)), state(world["a"]), state(world["b"])
    for name in merged:
        assert torch.allclose(merged[name], a[name] + 0.25 * (b[name] - a[name]), atol=1e-6), name

    config["models"].append({"model": world["c"]})
    with pytest.raises(mergelab.MergelabError, match=r"toy_lerp merges exactly two models \(base_model and one "
                                                     r"other\); got 3 \(without base_model, the first listed"):
        mergelab.merge(config, tmp_path / "three", quiet=True)


def test_a_method_with_per_model_tensor_files_needs_only_its_registry_entry(world, tmp_path, monkeypatch):
    from mergelab.methods import MergeMethod, Param

    monkeypatch.setitem(METHODS, "toy_masked", MergeMethod(
        "toy_masked", _masked_sum, (Param("keep", None, per_model=True, kind=str, tensor_file=True,
                                          help="path of the model's keep-mask file"),),
        "test", min_models=2, summary="Σ keep_i ⊙ θ_i"))
    a, b = state(world["a"]), state(world["b"])
    for name, fill in (("a", 1.0), ("b", 0.0)):  # keep all of a, none of b
        save_file({n: torch.full_like(t, fill) for n, t in a.items()}, tmp_path / f"{name}.safetensors")
    config = {"merge_method": "toy_masked", "models": [
        {"model": world[m], "parameters": {"keep": str(tmp_path / f"{m}.safetensors")}} for m in "ab"]}
    merged = state(mergelab.merge(config, tmp_path / "out", quiet=True))
    assert all(torch.equal(merged[name], a[name]) for name in merged)

    del config["models"][1]["parameters"]
    with pytest.raises(mergelab.MergelabError, match=r"model '.*/b' needs parameters.keep: the path of the model's "
                                                     r"keep-mask file"):
        mergelab.merge(config, tmp_path / "missing", quiet=True)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_normalize_with_weights_summing_to_zero_is_refused_before_merging(world, tmp_path, method):
    config = {"merge_method": method, "base_model": world["base"], "parameters": {"normalize": True},
              "models": [{"model": world["a"], "parameters": {"weight": 1.0}},
                         {"model": world["b"], "parameters": {"weight": -1.0}}]}
    with pytest.raises(mergelab.MergelabError, match=rf"{method} weights \[1\.0, -1\.0\] sum to zero for tensor "
                                                     r"'.+' and normalize is on; .*set normalize: false"):
        mergelab.merge(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("per_model, match", [
    (False, r"parameter 'densty' is not used by ties; its parameters are: .* \(did you mean 'density'\?\)"),
    (True, r"parameter 'wieght' of model '.*/a' is not used by ties; its per-model parameters are: density, "
           r"weight \(did you mean 'weight'\?\)"),
])
def test_a_misspelt_parameter_name_gets_a_suggestion(world, tmp_path, per_model, match):
    config = {"merge_method": "ties", "base_model": world["base"], "models": [{"model": world["a"]}]}
    if per_model:
        config["models"][0]["parameters"] = {"wieght": 2.0}
    else:
        config["parameters"] = {"densty": 0.5}
    with pytest.raises(mergelab.MergelabError, match=match):
        mergelab.merge(config, tmp_path / "out", quiet=True)
