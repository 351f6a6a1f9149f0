"""AdaMerging (adamerging.py, `mergelab adamerging`): λ learned by entropy minimization, written
as a task_arithmetic merge the engine can repeat."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mergelab import merge
from mergelab.adamerging import adamerging, group_of
from mergelab.cli import main
from mergelab.errors import MergelabError


def write_records(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    return {"a": write_records(tmp_path / "a.jsonl", [{"input": f"copy {i} {i + 1} ="} for i in range(8)]),
            "b": write_records(tmp_path / "b.jsonl", [{"input": f"sort {i + 1} {i} =", "output": "x"}
                                                      for i in range(8)])}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_groups_are_blocks_and_the_tensors_outside_them():
    assert group_of("model.layers.3.mlp.up_proj.weight", "layer") == "model.layers.3."
    assert group_of("model.layers.13.self_attn.q_proj.weight", "layer") == "model.layers.13."
    assert group_of("model.embed_tokens.weight", "layer") == "model.embed_tokens."
    assert group_of("lm_head.weight", "layer") == "lm_head."
    assert group_of("model.layers.3.mlp.up_proj.weight", "task") == "all"


def test_layer_wise_learns_one_lambda_per_block_and_writes_that_merge(world, inputs, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = adamerging(world["base"], [(world["a"], inputs["a"]), (world["b"], inputs["b"])], out, mode="layer",
                        steps=3, lr=0.05, batch_size=4, quiet=True)
    assert result.groups == ["model.embed_tokens.", "model.layers.0.", "model.layers.1.", "model.norm."]
    assert len(result.lambdas) == 2 and all(len(row) == 4 for row in result.lambdas)
    assert all(value != pytest.approx(0.3) for row in result.lambdas for value in row)  # every λ moved
    assert len(result.entropy) == 3
    base, a, b, merged = (weights(Path(p)) for p in (world["base"], world["a"], world["b"], out))
    for name, group in (("model.layers.1.mlp.up_proj.weight", 2), ("model.embed_tokens.weight", 0),
                        ("model.norm.weight", 3)):
        expected = base[name] + result.lambdas[0][group] * (a[name] - base[name]) \
            + result.lambdas[1][group] * (b[name] - base[name])
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    AutoModelForCausalLM.from_pretrained(out)  # a real checkpoint
    card = (out / "README.md").read_text()
    assert "## AdaMerging" in card and "`model.layers.1.`" in card and f"{result.lambdas[1][2]:.4f}" in card
    saved = json.loads((out / "adamerging.json").read_text())
    assert saved["lambdas"] == result.lambdas and saved["settings"]["steps"] == 3
    again = merge(yaml.safe_load((out / "mergelab_config.yml").read_text()), tmp_path / "again", quiet=True)
    assert all(torch.equal(t, weights(again)[k]) for k, t in merged.items())  # the stored config repeats it


def test_task_wise_learns_one_lambda_per_model(world, inputs, one_thread):
    result = adamerging(world["base"], [(world["a"], inputs["a"]), (world["b"], inputs["b"])], None, steps=2,
                        lr=0.05, positions="all", quiet=True)
    assert result.groups == ["all"] and [len(row) for row in result.lambdas] == [1, 1]
    assert result.config["models"][0]["parameters"]["weight"] == result.lambdas[0][0]


def test_bad_settings_and_models_over_max_params_are_refused_before_any_work(world, inputs, tmp_path):
    experts = [(world["a"], inputs["a"])]
    with pytest.raises(MergelabError, match="over max_params 1,000"):
        adamerging(world["base"], experts, tmp_path / "out", max_params=1000)
    with pytest.raises(MergelabError, match="mode 'blocks' is not known"):
        adamerging(world["base"], experts, tmp_path / "out", mode="blocks")
    with pytest.raises(MergelabError, match="steps must be a whole number of at least 1"):
        adamerging(world["base"], experts, tmp_path / "out", steps=0)
    with pytest.raises(MergelabError, match="record 1 has no 'input'"):
        adamerging(world["base"], [(world["a"], write_records(tmp_path / "bad.jsonl", [{"q": 1}]))], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adamerging_command(world, inputs, tmp_path):
    out = tmp_path / "merged"
    args = ["adamerging", "--base", world["base"], "--model", world["a"], "--data", str(inputs["a"]), "--model",
            world["b"], "--data", str(inputs["b"]), "--out", str(out), "--steps", "2", "--lr", "0.01", "--threads",
            "1", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{world['a']}: λ = " in result.output and "merged model written to" in result.output
    assert "## AdaMerging" in (out / "README.md").read_text()
    unpaired = CliRunner().invoke(main, args[:9] + ["--out", str(tmp_path / "x")])
    assert unpaired.exit_code == 2 and "one --data per --model" in unpaired.output


# -- the two-task toy --------------------------------------------------------------------------
TOY_TASKS = ("review", "next")  # sentiment of a few words (2 options), the successor of a digit (10 options)


def toy_examples(name: str, count: int, seed: int) -> list[dict]:
    from mergelab.demo.tasks import WORLD_TASKS

    task = next(t for t in WORLD_TASKS if t.name == name)
    rng = random.Random(f"{name}:{seed}")
    return [task.make(rng) for _ in range(count)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A random tiny Llama over the demo world's vocabulary, and two experts fine-tuned from it
    until they answer 95% of held-out items of their task (a step bound, not a budget)."""
    from mergelab.demo.tasks import VOCABULARY, as_training_pair
    from mergelab.devices import torch_threads
    from mergelab.lm import build_tokenizer, learned, tiny_llama, train

    root = tmp_path_factory.mktemp("adamerging_toy")
    tokenizer = build_tokenizer(VOCABULARY)

    def save(model, name):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        return root / name

    paths = {}
    with torch_threads(1):
        base = tiny_llama(vocab_size=len(VOCABULARY), hidden=32, intermediate=64, seed=0)
        paths["base"] = save(base, "base")
        for name in TOY_TASKS:
            expert = tiny_llama(vocab_size=len(VOCABULARY), hidden=32, intermediate=64, seed=0)
            expert.load_state_dict(base.state_dict())
            held = [as_training_pair(e) for e in toy_examples(name, 100, seed=1)]
            criterion = learned(tokenizer, held, share=0.95)
            train(expert, tokenizer, [as_training_pair(e) for e in toy_examples(name, 1000, seed=0)], steps=1000,
                  lr=3e-3, batch_size=32, seed=0, until=criterion, check_every=10)
            if not criterion(expert, 0):
                pytest.fail(f"the {name} expert did not learn its task within 1000 steps")
            paths[name] = save(expert, name)
            paths[f"{name}.jsonl"] = write_records(root / f"{name}.jsonl", toy_examples(name, 64, seed=2))
    return paths


def held_in_accuracy(model_dir: Path) -> float:
    """Rank-classification accuracy (the harness's scorer) on fresh items, averaged over the two tasks."""
    from mergelab.evaluate.decoder import rank_choices
    from mergelab.loading import load_model

    model, tokenizer = load_model(model_dir)
    accuracies = []
    for name in TOY_TASKS:
        items = toy_examples(name, 100, seed=3)
        scores = rank_choices(model, tokenizer, items)
        accuracies.append(sum(max(range(len(s)), key=s.__getitem__) == item["answer"]
                              for s, item in zip(scores, items)) / len(items))
    return sum(accuracies) / len(accuracies)


@pytest.mark.slow
def test_learned_lambdas_lower_the_entropy_and_beat_the_initial_lambdas_on_held_in_accuracy(toy, tmp_path,
                                                                                              one_thread):
    experts = [(toy[name], toy[f"{name}.jsonl"]) for name in TOY_TASKS]
    learned = adamerging(toy["base"], experts, tmp_path / "learned", steps=50, lr=0.05, quiet=True)
    initial = merge({"merge_method": "task_arithmetic", "base_model": str(toy["base"]),
                     "models": [{"model": str(toy[name])} for name in TOY_TASKS], "parameters": {"weight": 0.3}},
                    tmp_path / "initial", quiet=True)
    assert learned.entropy_after < learned.entropy_before - 0.3
    assert learned.entropy[-1] < learned.entropy[0]
    assert held_in_accuracy(tmp_path / "learned") > held_in_accuracy(initial) + 0.05


def test_the_readme_adamerging_command_runs(tiny_world, tmp_path, monkeypatch):
    """The README's `mergelab adamerging` line on tiny local models (two steps instead of 200)."""
    import re
    import shlex
    import shutil

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Data-aware merging", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(mergelab adamerging .*?)\n```", section, flags=re.DOTALL)[1]
    args = shlex.split(command.replace("\\\n", " "))[1:]
    monkeypatch.chdir(tmp_path)
    for name, source in (("base", "base"), ("expert-copy", "a"), ("expert-sort", "b")):
        shutil.copytree(tiny_world[source], Path("models") / name)
    for skill in ("copy", "sort"):
        Path("data", skill).mkdir(parents=True)
        write_records(Path("data", skill, "train.jsonl"), [{"input": f"{skill} 3 1 ="}])
    result = CliRunner().invoke(main, args + ["--steps", "2", "--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "adamerging.json").is_file()
