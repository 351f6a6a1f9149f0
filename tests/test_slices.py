"""Slices: layer ranges copied (passthrough stacking, depth up-scaling) or merged across models,
renumbered, with config.json cut to match; layer naming per architecture family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturbed, save_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import mergelab
from mergelab.config import Slice, load_config
from mergelab.errors import MergelabError
from mergelab.layers import cut_config, find_layout, plan_layers
from mergelab.lm import build_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory) -> dict[str, str]:
    """Two different 4-layer tiny Llamas (untied lm_head) and a 3-layer GPT-2, as HF directories."""
    root = tmp_path_factory.mktemp("slices")
    first = tiny_llama(layers=4, tie=False, seed=0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=18, n_embd=32, n_layer=3, n_head=2, n_positions=64))
    second = perturbed(first, seed=1, scale=0.1)
    return {"a": str(save_model(first, root / "a")), "b": str(save_model(second, root / "b")),
            "gpt2": str(save_model(gpt2, root / "gpt2"))}


def weights(directory) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def passthrough(*ranges: tuple[str, int, int]) -> dict:
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": m, "layer_range": [start, end]}]} for m, start, end in ranges]}


def generates(directory: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = build_tokenizer()
    out = model.generate(**tokenizer("copy 1 2 =", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == len(tokenizer("copy 1 2 =")["input_ids"]) + 4


def test_depth_up_scaling_stacks_overlapping_ranges_of_one_model(four_layers, tmp_path):
    # layers [0, 3) + [1, 4): the DUS recipe at small scale, 6 layers out of 4
    out = mergelab.merge(passthrough((four_layers["a"], 0, 3), (four_layers["a"], 1, 4)), tmp_path / "dus", quiet=True)
    source, merged = weights(four_layers["a"]), weights(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    picked = [0, 1, 2, 1, 2, 3]
    for out_index, in_index in enumerate(picked):
        for name in (n for n in source if n.startswith(f"model.layers.{in_index}.")):
            renamed = name.replace(f"model.layers.{in_index}.", f"model.layers.{out_index}.", 1)
            assert torch.equal(merged[renamed], source[name]), renamed
    assert not any(n.startswith("model.layers.6.") for n in merged)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], source[name])
    assert len(merged) == len(source) + 2 * 9  # two more blocks of 9 tensors
    generates(out)


def test_a_two_model_frankenmerge_takes_the_last_slices_head(four_layers, tmp_path):
    out = mergelab.merge(passthrough((four_layers["a"], 0, 2), (four_layers["b"], 1, 4)), tmp_path / "fm", quiet=True)
    a, b, merged = weights(four_layers["a"]), weights(four_layers["b"]), weights(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    name = "self_attn.q_proj.weight"
    assert torch.equal(merged[f"model.layers.1.{name}"], a[f"model.layers.1.{name}"])
    assert torch.equal(merged[f"model.layers.2.{name}"], b[f"model.layers.1.{name}"])
    assert torch.equal(merged[f"model.layers.4.{name}"], b[f"model.layers.3.{name}"])
    # embeddings from the first slice, final norm and lm_head from the last (as mergekit)
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])
    generates(out)


def test_a_merged_slice_interpolates_gradients_over_its_own_layers(four_layers, tmp_path):
    # weight gradients [1, 0] on a and [0, 1] on b over the slice's two layers: layer 0 is a's,
    # layer 1 is b's; the copied slice after it keeps a's layer 3 as layer 2
    config = {"merge_method": "linear", "slices": [
        {"sources": [{"model": four_layers["a"], "layer_range": [1, 3], "parameters": {"weight": [1.0, 0.0]}},
                     {"model": four_layers["b"], "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}}]},
        {"sources": [{"model": four_layers["a"], "layer_range": [3, 4]}]},
    ]}
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    a, b, merged = weights(four_layers["a"]), weights(four_layers["b"]), weights(out)
    name = "mlp.down_proj.weight"
    torch.testing.assert_close(merged[f"model.layers.0.{name}"], a[f"model.layers.1.{name}"])
    torch.testing.assert_close(merged[f"model.layers.1.{name}"], b[f"model.layers.1.{name}"])
    assert torch.equal(merged[f"model.layers.2.{name}"], a[f"model.layers.3.{name}"])
    # the embeddings come from the first slice at its first position: a's
    torch.testing.assert_close(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    generates(out)


def test_slice_parameters_and_a_base_model(four_layers, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": four_layers["a"], "slices": [
        {"sources": [{"model": four_layers["a"], "layer_range": [0, 4]}, {"model": four_layers["b"],
                                                                         "layer_range": [0, 4]}],
         "parameters": {"weight": 0.5}}]}
    merged, a, b = weights(mergelab.merge(config, tmp_path / "out", quiet=True)), weights(four_layers["a"]), \
        weights(four_layers["b"])
    for name in ("model.layers.2.mlp.up_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name], a[name] + 0.5 * (b[name] - a[name]))


def test_gpt2_layers_are_found_and_renumbered(four_layers, tmp_path):
    out = mergelab.merge(passthrough((four_layers["gpt2"], 2, 3), (four_layers["gpt2"], 0, 2)), tmp_path / "g",
                         quiet=True)
    source, merged = weights(four_layers["gpt2"]), weights(out)
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] == 3
    assert torch.equal(merged["transformer.h.0.mlp.c_fc.weight"], source["transformer.h.2.mlp.c_fc.weight"])
    assert torch.equal(merged["transformer.h.1.mlp.c_fc.weight"], source["transformer.h.0.mlp.c_fc.weight"])
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("names, prefix", [
    (["model.layers.0.mlp.up_proj.weight"], "model.layers."),
    (["transformer.h.11.attn.c_attn.weight"], "transformer.h."),
    (["gpt_neox.layers.3.attention.dense.weight"], "gpt_neox.layers."),
    (["bert.encoder.layer.0.attention.self.query.weight"], "bert.encoder.layer."),
    (["encoder.layer.5.output.dense.weight"], "encoder.layer."),
    (["model.decoder.layers.2.fc1.weight"], "model.decoder.layers."),
])
def test_layer_layouts_of_the_common_families(names, prefix):
    assert find_layout(names + ["lm_head.weight"]).prefix == prefix


def test_an_unknown_layout_is_a_clear_error():
    with pytest.raises(MergelabError, match=r"model 'x': no tensor name follows a known layer layout.*"
                                            r"model\.layers\.N"):
        find_layout(["net.stack.0.weight", "head.weight"], "model 'x'")


def test_plan_layers_positions_run_over_each_slice():
    slices = [Slice(sources=[{"model": "m", "layer_range": [0, 3]}]),
              Slice(sources=[{"model": "m", "layer_range": [2, 3]}])]
    layers = plan_layers(slices, {"m": 3})
    assert [layer.position for layer in layers] == [0.0, 0.5, 1.0, 1.0]
    assert [layer.sources for layer in layers] == [(("m", 0),), (("m", 1),), (("m", 2),), (("m", 2),)]


def test_per_layer_config_lists_are_cut_to_the_picked_layers():
    config = {"num_hidden_layers": 4, "layer_types": ["a0", "a1", "a2", "a3"], "hidden_size": 8,
              "rope_scaling": None}
    slices = [Slice(sources=[{"model": "m", "layer_range": [1, 3]}]),
              Slice(sources=[{"model": "m", "layer_range": [0, 4]}])]
    cut = cut_config(config, plan_layers(slices, {"m": 4}), {"m": config}, 4)
    assert cut == {"num_hidden_layers": 6, "layer_types": ["a1", "a2", "a0", "a1", "a2", "a3"], "hidden_size": 8,
                   "rope_scaling": None}


@pytest.mark.parametrize("config, match", [
    (lambda m: passthrough((m["a"], 2, 5)), r"layer_range \[2, 5\) of model .* goes past its 4 layers; the last "
                                            r"range it has is \[1, 4\)"),
    (lambda m: {"merge_method": "passthrough", "slices": [{"sources": [
        {"model": m["a"], "layer_range": [0, 2]}, {"model": m["b"], "layer_range": [0, 2]}]}]},
     r"passthrough merges exactly 1 models"),
    (lambda m: {"merge_method": "linear", "slices": [{"sources": [
        {"model": m["a"], "layer_range": [0, 2]}, {"model": m["b"], "layer_range": [0, 3]}]}]},
     r"the sources of slices\[0\] take different numbers of layers \(2, 3\)"),
    (lambda m: {"merge_method": "ties", "base_model": m["gpt2"], "slices": [{"sources": [
        {"model": m["a"], "layer_range": [0, 2]}, {"model": m["b"], "layer_range": [0, 2]}]}]},
     r"slices\[0\] merges 2 sources with ties, which needs base_model among them"),
    (lambda m: passthrough((m["a"], 0, 2), (m["gpt2"], 0, 2)),
     r"keeps its layers under 'transformer\.h\.N\.' but model .* under 'model\.layers\.N\.'"),
    (lambda m: {**passthrough((m["a"], 0, 2)), "models": [{"model": m["a"]}]}, r"has both 'models' and 'slices'"),
])
def test_bad_slices_are_refused_before_any_work(four_layers, tmp_path, config, match):
    with pytest.raises(MergelabError, match=match):
        mergelab.merge(config(four_layers), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_slices_config_round_trips_through_yaml(four_layers):
    config = load_config(passthrough((four_layers["a"], 0, 2), (four_layers["a"], 1, 3)))
    assert load_config(config.to_yaml()).model_dump() == config.model_dump()


def test_the_readme_slices_example_merges(four_layers, tmp_path, monkeypatch):
    import re
    import shutil

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Slices and vocabularies", 1)[1].split("\n### ", 1)[0]
    config = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)[0])
    for name, source in {"expert-copy": "a", "expert-sort": "b"}.items():
        shutil.copytree(four_layers[source], tmp_path / "models" / name)
    monkeypatch.chdir(tmp_path)
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    generates(out)
