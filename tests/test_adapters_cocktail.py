"""LM-Cocktail with adapter candidates: losses from base+adapter, the merged model from the
engine's base+adapter inputs, and with output="adapter" the cocktail of the ΔWs as one adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mergelab
from mergelab.cocktail import cocktail
from mergelab.cocktail.loss import candidate_loss
from mergelab.cocktail.weights import softmax_weights
from mergelab.errors import MergelabError
from mergelab.lm import make_examples

from test_adapters import lora_world, merged_by_peft  # noqa: F401  (the module-scoped fixture)
from test_adapters_merge import peft_merge, products

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def five():
    return make_examples("sort", 5, seed=11)


def test_adapter_candidates_score_as_their_merged_checkpoints(lora_world, tmp_path, five):
    result = cocktail(tmp_path / "out", finetuned=str(lora_world["reverse"]), base=str(lora_world["llama"]),
                      peers=[str(lora_world["sort"])], examples=five, alpha=0.5, threads=1)
    merged = mergelab.merge({"merge_method": "passthrough", "models": [{"model": str(lora_world["sort"])}]},
                            tmp_path / "sort-merged", quiet=True)
    assert result.losses[0] == pytest.approx(candidate_loss(lora_world["llama"], five, threads=1), abs=1e-6)
    assert result.losses[1] == pytest.approx(candidate_loss(merged, five, threads=1), abs=1e-5)
    assert result.weights == pytest.approx(softmax_weights(result.losses, 5.0))
    # M_r = α·M_t + (1 − α)·Σ w_i·M_i, each adapter model as PEFT merges it
    base = AutoModelForCausalLM.from_pretrained(lora_world["llama"], dtype=torch.float32).state_dict()
    target = merged_by_peft(lora_world["llama"], lora_world["reverse"])
    sort = merged_by_peft(lora_world["llama"], lora_world["sort"])
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    w_base, w_sort = result.weights
    for name in base:
        expected = 0.5 * target[name] + 0.5 * (w_base * base[name] + w_sort * sort[name])
        assert torch.allclose(got[name], expected, atol=1e-5), name


def test_output_adapter_is_the_cocktail_of_the_deltas(lora_world, tmp_path, five):
    result = cocktail(tmp_path / "out", finetuned=str(lora_world["reverse"]), base=str(lora_world["llama"]),
                      peers=[str(lora_world["sort"])], examples=five, alpha=0.6, threads=1, output="adapter")
    assert (tmp_path / "out" / "adapter_config.json").is_file() and (tmp_path / "out" / "cocktail.json").is_file()
    # ΔW_r = α·ΔW_t + (1 − α)·w_sort·ΔW_sort (the base's ΔW is zero), refactored by SVD to rank 4 as PEFT does
    weights = (0.6, 0.4 * result.weights[1])
    expected = products(peft_merge(lora_world, ("reverse", "sort"), weights, "svd", svd_rank=4))
    got = products(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    for module in expected:
        assert torch.allclose(got[module], expected[module], atol=1e-5), module
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(lora_world["llama"], dtype=torch.float32), tmp_path / "out")
    assert model is not None


def test_mono_recipe_as_adapter_is_exact(lora_world, tmp_path):
    cocktail(tmp_path / "out", finetuned=str(lora_world["sort"]), base=str(lora_world["llama"]), recipe="mono",
             alpha=0.3, output="adapter")
    base = AutoModelForCausalLM.from_pretrained(lora_world["llama"], dtype=torch.float32).state_dict()
    sort = merged_by_peft(lora_world["llama"], lora_world["sort"])
    got = merged_by_peft(lora_world["llama"], tmp_path / "out")
    for name in base:
        assert torch.allclose(got[name], base[name] + 0.3 * (sort[name] - base[name]), atol=1e-6), name


def test_output_adapter_needs_adapters(lora_world, tmp_path, five):
    with pytest.raises(MergelabError, match="needs adapters"):
        cocktail(tmp_path / "out", finetuned=str(lora_world["llama"]), base=str(lora_world["llama"]),
                 recipe="mono", output="adapter")
    with pytest.raises(MergelabError, match="is a full model, not an adapter of"):
        cocktail(tmp_path / "out", finetuned=str(lora_world["sort"]), base=str(lora_world["gpt2"]),
                 recipe="mono", output="adapter")
    assert not (tmp_path / "out").exists()
