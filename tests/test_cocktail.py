"""LM-Cocktail: Eq. 2 weights against an independent computation, every recipe end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.cocktail import alpha_sweep, cocktail, fewshot_losses, fewshot_weights
from mergelab.lm import make_examples
from mergelab.io import CheckpointReader

FIVE = make_examples("copy", 5, seed=21, length=(2, 4))


def independent_loss(path, examples) -> float:
    """Plain transformers: labels -100 on the input, loss = mean CE of output + EOS; mean over examples."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    losses = []
    for example in examples:
        prompt = tokenizer(example["input"])["input_ids"]
        ids = tokenizer(example["input"] + " " + example["output"])["input_ids"] + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt) + ids[len(prompt):]
        with torch.no_grad():
            losses.append(float(model(torch.tensor([ids]), labels=torch.tensor([labels])).loss))
    return sum(losses) / len(losses)


def state(path):
    reader = CheckpointReader(path)
    return {name: reader.get(name).float() for name in reader.tensors}


def test_weights_equal_the_paper_formula_computed_independently(world):
    models = [world["base"], world["a"], world["b"], world["c"]]
    losses = [independent_loss(m, FIVE) for m in models]
    expected = [math.exp(-l / 5.0) for l in losses]
    expected = [e / sum(expected) for e in expected]
    assert fewshot_losses(models, FIVE, batch_size=2) == pytest.approx(losses, abs=1e-5)
    assert fewshot_weights(models, FIVE, temperature=5.0) == pytest.approx(expected, abs=1e-6)
    assert sum(fewshot_weights(models, FIVE, temperature=0.1)) == pytest.approx(1.0)


def test_an_api_call_writes_nothing_to_stderr(world, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process: transformers shows its bars by default
    fewshot_weights([world["base"], world["a"]], FIVE, threads="auto")
    assert capfd.readouterr().err == ""


def test_the_model_that_knows_the_task_gets_the_weight(copy_model, world):
    _, _, trained = copy_model
    losses = fewshot_losses([world["base"], trained], FIVE)
    weights = fewshot_weights([world["base"], trained], FIVE, temperature=1.0)
    # any training on the skill lowers its loss below a random model's; by how much depends on the run
    assert losses[1] < losses[0] and weights[1] > 0.5


def test_full_recipe_writes_eq1(world, copy_model, tmp_path):
    _, _, trained = copy_model
    result = cocktail(tmp_path / "out", finetuned=trained, base=world["base"], peers=[world["a"]], examples=FIVE,
                      alpha=0.3)
    assert result.recipe == "full" and result.weights == pytest.approx(
        fewshot_weights([world["base"], world["a"]], FIVE))
    merged, tuned, base, peer = state(tmp_path / "out"), state(trained), state(world["base"]), state(world["a"])
    w = result.weights
    for name in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        expected = 0.3 * tuned[name] + 0.7 * (w[0] * base[name] + w[1] * peer[name])
        assert torch.allclose(merged[name], expected, atol=1e-6)
    assert json.loads((tmp_path / "out" / "cocktail.json").read_text())["recipe"] == "full"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()  # transformers reads it back
    for name in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(reloaded[name].float(), merged[name])


def test_mono_recipe_needs_no_examples(world, tmp_path):
    result = cocktail(tmp_path / "out", finetuned=world["a"], base=world["base"], alpha=0.5)
    assert result.recipe == "mono"
    merged, a, base = state(tmp_path / "out"), state(world["a"]), state(world["base"])
    assert torch.allclose(merged["model.norm.weight"], (a["model.norm.weight"] + base["model.norm.weight"]) / 2)


def test_without_finetuning_and_unified(world, tmp_path):
    no_ft = cocktail(tmp_path / "plain", base=world["base"], peers=[world["a"], world["b"]], examples=FIVE)
    assert no_ft.recipe == "no_finetune" and no_ft.finetuned is None
    merged = state(tmp_path / "plain")
    parts = [state(world[m]) for m in ("base", "a", "b")]
    name = "model.norm.weight"
    assert torch.allclose(merged[name], sum(w * p[name] for w, p in zip(no_ft.weights, parts)), atol=1e-6)

    sort_examples = make_examples("sort", 5, seed=3)
    unified = cocktail(None, base=world["base"], peers=[world["a"]], examples={"copy": FIVE, "sort": sort_examples})
    assert unified.recipe == "unified"
    assert unified.weights == pytest.approx(fewshot_weights([world["base"], world["a"]], FIVE + sort_examples))


def test_blackbox_recipe_stays_on_the_simplex(world, tmp_path):
    result = cocktail(tmp_path / "bb", finetuned=world["a"], base=world["base"], peers=[world["b"]], examples=FIVE,
                      recipe="blackbox", budget=6, seed=1)
    assert result.recipe == "blackbox" and sum(result.weights) == pytest.approx(1.0)
    assert all(w >= 0 for w in result.weights)
    assert (tmp_path / "bb" / "model.safetensors").is_file()


def test_blackbox_without_nevergrad_names_the_extra(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "nevergrad", None)
    with pytest.raises(MergelabError, match=r"mergelab\[blackbox\]"):
        cocktail(None, base=world["base"], peers=[world["a"]], examples=FIVE, recipe="blackbox", budget=2)


@pytest.mark.parametrize("kwargs,match", [
    ({"examples": []}, "empty"),
    ({"examples": [{"input": "copy 1 ="}]}, "missing 'output'"),
    ({"examples": [{"input": "copy 1 =", "output": 1}]}, "'output' must be a string"),
    ({"examples": [{"query": "q", "pos": "p", "neg": []}], "model_type": "encoder"}, "'pos' must be a list"),
    ({"examples": FIVE, "temperature": 0}, "temperature"),
    ({"examples": FIVE, "alpha": 1.5, "finetuned": "A"}, "alpha"),
    ({"examples": [{"query": "q", "pos": ["p"], "neg": ["n"]}], "model_type": "encoder"}, "negatives"),
    ({"examples": FIVE, "recipe": "mono"}, "fine-tuned"),
    ({"examples": None}, "examples"),
])
def test_bad_cocktail_inputs_are_refused(world, kwargs, match):
    if kwargs.get("finetuned") == "A":
        kwargs["finetuned"] = world["a"]
    with pytest.raises(MergelabError, match=match):
        cocktail(None, base=world["base"], peers=[world["a"]], **kwargs)


def test_different_architectures_are_refused(world, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import save_model

    gpt2 = save_model(GPT2LMHeadModel(GPT2Config(vocab_size=18, n_embd=16, n_layer=1, n_head=2)), tmp_path / "g")
    with pytest.raises(MergelabError, match="different architectures"):
        cocktail(None, base=world["base"], peers=[str(gpt2)], examples=FIVE)


def test_cli_weights_merge_and_sweep(world, tmp_path):
    examples = tmp_path / "five.jsonl"
    examples.write_text("\n".join(json.dumps(e) for e in FIVE))
    runner = CliRunner()
    result = runner.invoke(main, ["cocktail", "weights", "--base", world["base"], "--peer", world["a"],
                                  "--examples", str(examples), "--json"])
    assert result.exit_code == 0, result.output
    assert sum(json.loads(result.stdout)["weights"]) == pytest.approx(1.0)
    result = runner.invoke(main, ["cocktail", "merge", str(tmp_path / "m"), "--finetuned", world["a"], "--base",
                                  world["base"], "--peer", world["b"], "--examples", str(examples), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "recipe: full" in result.output
    (tmp_path / "tasks.yml").write_text(
        "tasks:\n"
        f"  - {{name: copy, kind: loss, examples: {json.dumps(make_examples('copy', 8, seed=5))}}}\n"
        f"  - {{name: sort, kind: loss, examples: {json.dumps(make_examples('sort', 8, seed=5))}}}\n")
    result = runner.invoke(main, ["cocktail", "sweep", str(tmp_path / "sweep"), "--finetuned", world["a"], "--base",
                                  world["base"], "--tasks", str(tmp_path / "tasks.yml"), "--target", "copy",
                                  "--alphas", "0,0.5,1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "sweep.csv").read_text().count("\n") == 4
    assert not any(p.name.startswith(".sweep-") for p in (tmp_path / "sweep").iterdir())
    bad = runner.invoke(main, ["cocktail", "sweep", str(tmp_path / "s2"), "--finetuned", world["a"], "--base",
                               world["base"], "--tasks", str(tmp_path / "tasks.yml"), "--target", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_sweep_with_an_evaluate_callable_traces_alpha(world, tmp_path):
    seen = []

    def evaluate(model_dir):
        norm = state(model_dir)["model.norm.weight"]
        seen.append(model_dir)
        return {"target": float(norm.mean()), "other": 1.0}

    rows = alpha_sweep(tmp_path / "s", finetuned=world["a"], base=world["base"], evaluate=evaluate,
                       target=["target"], alphas=[0.0, 1.0])
    a, base = state(world["a"])["model.norm.weight"], state(world["base"])["model.norm.weight"]
    assert rows[0]["target"] == pytest.approx(float(base.mean()), abs=1e-6)
    assert rows[1]["target"] == pytest.approx(float(a.mean()), abs=1e-6)
    assert not seen[0].exists()  # merged models are removed unless kept


def test_blackbox_merges_with_the_registry_s_eq1(world):
    from mergelab.cocktail.blackbox import merged_state

    states = [state(world[m]) for m in ("base", "b")]
    anchor = state(world["a"])
    merged = merged_state(states, [0.25, 0.75], anchor, alpha=0.4)
    name = "model.norm.weight"
    expected = 0.4 * anchor[name] + 0.6 * (0.25 * states[0][name] + 0.75 * states[1][name])
    assert torch.allclose(merged[name], expected, atol=1e-6)
    assert torch.equal(states[0][name], state(world["base"])[name])  # the inputs are left untouched
    plain = merged_state(states, [0.25, 0.75])
    assert torch.allclose(plain[name], 0.25 * states[0][name] + 0.75 * states[1][name], atol=1e-6)


def test_blackbox_optimizes_the_same_loss_as_eq2(world, tmp_path):
    """The loss options reach the black-box objective: its best loss is the few-shot loss, with the
    same options, of the model the recipe writes."""
    from mergelab.cocktail import LossOptions

    options = LossOptions(max_length=6)  # cuts the inputs, so the loss differs from the default one
    result = cocktail(tmp_path / "bb", base=world["base"], peers=[world["a"]], examples=FIVE, recipe="blackbox",
                      budget=3, seed=0, options=options)
    from mergelab.cocktail.blackbox import blackbox_weights

    weights, best = blackbox_weights([world["base"], world["a"]], FIVE, budget=3, seed=0, options=options)
    assert weights == pytest.approx(result.weights)
    [written] = fewshot_losses([tmp_path / "bb"], FIVE, options=options)
    assert best == pytest.approx(written, abs=1e-5)
    [default] = fewshot_losses([tmp_path / "bb"], FIVE)
    assert abs(default - written) > 1e-3


def test_each_cocktail_subcommand_gets_exactly_its_options():
    from mergelab.cli import cocktail as group
    from mergelab.cocktail import LossOptions

    def names(command):
        return {option for param in group.commands[command].params for option in param.opts}

    loss_flags = {"--" + name.replace("_", "-") for name in LossOptions.field_names()}
    for command in ("merge", "weights", "sweep"):
        assert loss_flags | {"--tokenizer", "--examples", "--recipe"} <= names(command)
    assert "--alpha" in names("merge") and "--alpha" in names("weights")
    assert "--alpha" not in names("sweep") and "--alphas" in names("sweep")


def test_candidates_of_one_architecture_share_a_model_with_the_same_losses(world, tmp_path):
    """fewshot_losses refills one model in place for candidates with the same config and tensors;
    a bfloat16 copy, a legacy .bin checkpoint and a model of another size in between are loaded
    in full. Every loss equals that of the candidate loaded alone, exactly."""
    from conftest import save_model

    from mergelab.cocktail.loss import candidate_loss
    from mergelab.lm import tiny_llama

    bf16 = tmp_path / "a-bf16"
    AutoModelForCausalLM.from_pretrained(world["a"]).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(world["a"]).save_pretrained(bf16)
    legacy = save_model(AutoModelForCausalLM.from_pretrained(world["b"]), tmp_path / "b-bin", safe=False)
    other = save_model(tiny_llama(seed=3, hidden=48), tmp_path / "other")
    models = [world["base"], world["a"], str(bf16), world["c"], str(legacy), str(other), world["b"], world["base"]]
    alone = [candidate_loss(m, FIVE, threads=1) for m in models]
    assert fewshot_losses(models, FIVE, threads=1) == alone


def test_the_loss_projects_only_the_scored_positions_and_equals_the_full_logits_loss(world):
    """The vocabulary projection runs on the positions some example's output (or EOS) is
    predicted from, not on the whole padded batch, and each example's loss is still the plain
    transformers loss over full logits."""
    from mergelab.cocktail.loss import load_candidate
    from mergelab.evaluate.decoder import example_losses, split_encode

    model, tokenizer = load_candidate(world["a"], "decoder")
    projected = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: projected.append(args[0].shape))
    try:
        losses = example_losses(model, tokenizer, FIVE, batch_size=len(FIVE))
    finally:
        hook.remove()
    [shape] = projected  # one batch: (examples, positions, hidden)
    pairs = [split_encode(tokenizer, e["input"], e["output"]) for e in FIVE]
    # output + EOS at positions len(context) .., each predicted from the position before it
    predicting = set().union(*(range(len(context) - 1, len(context) + len(output)) for context, output in pairs))
    width = max(len(context) + len(output) + 1 for context, output in pairs)
    assert shape[1] == len(predicting) < width - 1
    assert [loss for loss, _ in losses] == pytest.approx([independent_loss(world["a"], [e]) for e in FIVE], abs=1e-5)


def test_a_small_candidate_model_is_kept_for_the_next_call(world, monkeypatch):
    """A second fewshot_losses call builds no model (the kept one is refilled from each
    candidate's files) and gives the same losses; the candidates' files are left as they were
    (the model maps them copy-on-write); above KEEP_BETWEEN_CALLS_BYTES nothing is kept."""
    import hashlib

    import mergelab.cocktail.loss as loss_module

    models = [world["base"], world["a"], world["b"]]
    digests = {m: hashlib.sha256((Path(m) / "model.safetensors").read_bytes()).hexdigest() for m in models}
    first = fewshot_losses(models, FIVE, threads=1)
    builds = []
    real_load = loss_module.load_candidate
    monkeypatch.setattr(loss_module, "load_candidate", lambda *a, **k: builds.append(a[0]) or real_load(*a, **k))
    assert fewshot_losses(models, FIVE, threads=1) == first
    assert builds == []
    assert {m: hashlib.sha256((Path(m) / "model.safetensors").read_bytes()).hexdigest() for m in models} == digests

    monkeypatch.setattr(loss_module, "KEEP_BETWEEN_CALLS_BYTES", 0)
    fewshot_losses(models, FIVE, threads=1)  # takes the kept model, keeps none
    assert fewshot_losses(models, FIVE, threads=1) == first
    assert builds == [Path(world["base"])]
