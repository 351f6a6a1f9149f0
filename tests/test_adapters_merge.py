"""Adapter -> adapter merges, checked against PEFT's own add_weighted_adapter on the same
adapters: the factors exactly for linear/cat/ties/magnitude_prune, the reconstructed ΔW for svd."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mergelab
from mergelab.adapters.combine import merge_adapters
from mergelab.errors import MergelabError
from safetensors.torch import load_file

from test_adapters import lora_world  # noqa: F401  (the module-scoped fixture)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def peft_merge(world, names, weights, combination, **kwargs) -> dict[str, torch.Tensor]:
    """The merged adapter's tensors as PEFT's add_weighted_adapter makes them."""
    from peft.utils import get_peft_model_state_dict

    base = AutoModelForCausalLM.from_pretrained(world["llama"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, world[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(world[name], adapter_name=name)
    model.add_weighted_adapter(list(names), list(weights), "merged", combination_type=combination, **kwargs)
    return get_peft_model_state_dict(model, adapter_name="merged")


def ours(world, names, weights, out, combination, **kwargs) -> dict[str, torch.Tensor]:
    merge_adapters([world[n] for n in names], weights, out, combination=combination, **kwargs)
    return load_file(out / "adapter_model.safetensors")


def products(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B·A per module (the ΔW a scale-1 adapter adds)."""
    out = {}
    for key in state:
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = state[module + ".lora_B.weight"] @ state[key]
    return out


@pytest.mark.parametrize("combination, kwargs", [
    ("linear", {}), ("cat", {}), ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}), ("dare_linear", {"density": 1.0}), ("dare_ties", {"density": 1.0}),
])
def test_factor_combinations_equal_peft(lora_world, tmp_path, combination, kwargs):
    names, weights = ("sort", "reverse"), (0.7, -0.4)
    expected = peft_merge(lora_world, names, weights, combination, **kwargs)
    got = ours(lora_world, names, weights, tmp_path / "out", combination, **kwargs)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-7, rtol=1e-6), key


@pytest.mark.parametrize("combination, kwargs", [
    ("svd", {}), ("svd", {"svd_rank": 2}), ("ties_svd", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.3}),
    ("dare_linear_svd", {"density": 1.0}), ("dare_ties_svd", {"density": 1.0}),
])
def test_svd_combinations_reconstruct_peft_delta(lora_world, tmp_path, combination, kwargs):
    names, weights = ("sort", "reverse"), (1.0, 0.5)
    expected = products(peft_merge(lora_world, names, weights, combination, **kwargs))
    got = products(ours(lora_world, names, weights, tmp_path / "out", combination, **kwargs))
    assert set(got) == set(expected)
    for module in expected:
        assert torch.allclose(got[module], expected[module], atol=1e-5), module


def test_cat_of_adapters_on_different_modules_is_exact_and_loads(lora_world, tmp_path):
    """cat of a rank-4 and a rank-8 adapter (other modules, an embedding LoRA, a saved norm):
    PEFT's factors, and loaded with PeftModel the merged model is base + w_1·ΔW_1 + w_2·ΔW_2."""
    names, weights = ("sort", "rich"), (1.0, 0.5)
    expected = peft_merge(lora_world, names, weights, "cat")
    got = ours(lora_world, names, weights, tmp_path / "out", "cat")
    lora_keys = {k for k in expected if ".lora_" in k}
    # PEFT's merged adapter drops rich's saved norm (its config is the first adapter's); ours keeps it
    assert set(got) == lora_keys | {"base_model.model.model.norm.weight"}
    for key in lora_keys:
        assert torch.allclose(got[key], expected[key], atol=1e-7), key

    def merged(adapter_dir, scale=1.0):
        base = AutoModelForCausalLM.from_pretrained(lora_world["llama"], dtype=torch.float32)
        return peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()

    base = AutoModelForCausalLM.from_pretrained(lora_world["llama"], dtype=torch.float32).state_dict()
    sort, rich, both = merged(lora_world["sort"]), merged(lora_world["rich"]), merged(tmp_path / "out")
    for name, value in both.items():
        target = rich[name] if name == "model.norm.weight" else (
            base[name] + (sort[name] - base[name]) + 0.5 * (rich[name] - base[name]))
        assert torch.allclose(value, target, atol=1e-5), name


def test_merged_adapter_loads_and_is_an_engine_input(lora_world, tmp_path):
    merge_adapters([lora_world["sort"], lora_world["reverse"]], [0.5, 0.5], tmp_path / "both", combination="svd",
                   svd_rank=8)
    base = AutoModelForCausalLM.from_pretrained(lora_world["llama"], dtype=torch.float32)
    via_peft = peft.PeftModel.from_pretrained(base, tmp_path / "both").merge_and_unload().state_dict()
    out = mergelab.merge({"merge_method": "passthrough", "models": [{"model": str(tmp_path / "both")}]},
                         tmp_path / "model", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name in via_peft:
        assert torch.allclose(model[name], via_peft[name], atol=1e-6), name


def test_yaml_output_adapter(lora_world, tmp_path):
    llama = lora_world["llama"]
    config = {"merge_method": "ties", "output": "adapter", "parameters": {"density": 0.5},
              "models": [{"model": f"{llama}+{lora_world['sort']}", "parameters": {"weight": 0.7}},
                         {"model": str(lora_world["reverse"]), "parameters": {"weight": -0.4}}]}
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    expected = peft_merge(lora_world, ("sort", "reverse"), (0.7, -0.4), "ties", density=0.5)
    got = load_file(out / "adapter_model.safetensors")
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-7), key


def test_dare_masks_are_seeded(lora_world, tmp_path):
    args = ([lora_world["sort"], lora_world["reverse"]], [1.0, 1.0])
    first = ours(lora_world, ("sort", "reverse"), args[1], tmp_path / "a", "dare_linear", density=0.5, seed=3)
    again = ours(lora_world, ("sort", "reverse"), args[1], tmp_path / "b", "dare_linear", density=0.5, seed=3)
    other = ours(lora_world, ("sort", "reverse"), args[1], tmp_path / "c", "dare_linear", density=0.5, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_merge_errors_are_one_line(lora_world, tmp_path):
    with pytest.raises(MergelabError, match="needs adapters of one rank .* use cat or an svd combination"):
        merge_adapters([lora_world["sort"], lora_world["rich"]], [1, 1], tmp_path / "o", combination="linear")
    with pytest.raises(MergelabError, match="needs density in"):
        merge_adapters([lora_world["sort"], lora_world["reverse"]], [1, 1], tmp_path / "o", combination="ties")
    with pytest.raises(MergelabError, match="one weight per adapter"):
        merge_adapters([lora_world["sort"], lora_world["reverse"]], [1], tmp_path / "o")
    with pytest.raises(MergelabError, match="DoRA"):
        merge_adapters([lora_world["sort"], lora_world["dora"]], [1, 1], tmp_path / "o", combination="svd")
    with pytest.raises(MergelabError, match="the adapters name different base models .*gpt2.*llama"):
        merge_adapters([lora_world["sort"], lora_world["gpt2_lora"]], [1, 1], tmp_path / "o", combination="cat")
    with pytest.raises(MergelabError, match="is not a PEFT adapter; output: adapter merges adapters"):
        mergelab.merge({"merge_method": "svd", "output": "adapter", "models": [{"model": str(lora_world["llama"])}]},
                       tmp_path / "o")
    assert not (tmp_path / "o").exists()
