"""The CLI is thin and the README's commands are true."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergelab.cli import main
from mergelab.demo import run_demo
from mergelab.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_starts_with_the_two_fresh_machine_commands():
    first, second = code_blocks("bash")[:2]
    assert first.strip().endswith("mergelab demo")
    assert second.strip().endswith("python -m pytest -q")
    assert README.index(first) < README.index("## Merge checkpoints")


def test_ci_runs_exactly_the_readme_test_command():
    test_command = code_blocks("bash")[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert "pip install torch==2.13.0" in test_command


def test_readme_examples_run(tiny_world, tmp_path, monkeypatch):
    """Every Python block of the README, in order, plus its merge YAML and CLI command, with
    the README's model names pointing at tiny local models."""
    import json

    from mergelab.lm import make_examples

    models = tmp_path / "models"
    models.mkdir()
    for name, source in {"base": "base", "expert-copy": "a", "expert-sort": "b"}.items():
        shutil.copytree(tiny_world[source], models / name)
    (tmp_path / "merge.yml").write_text(code_blocks("yaml")[0])
    (tmp_path / "five.jsonl").write_text("".join(json.dumps(e) + "\n" for e in make_examples("copy", 5, seed=0)))
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks("python")
    assert len(blocks) >= 3  # merge, cocktail, SFA
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "resilient" / "cocktail.json").is_file()
    result = CliRunner().invoke(main, ["merge", "merge.yml", "merged2", "--quiet", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "merged model written to" in result.output


@pytest.fixture
def example_ties(tiny_world, tmp_path) -> Path:
    """examples/ties.yml beside tiny local models under the model paths it names."""
    for name, source in {"base": "base", "expert-copy": "a", "expert-sort": "b"}.items():
        shutil.copytree(tiny_world[source], tmp_path / "models" / name)
    return Path(shutil.copy(ROOT / "examples" / "ties.yml", tmp_path / "ties.yml"))


def test_example_config_plans_the_merge_it_describes(example_ties, tmp_path):
    import torch

    from mergelab.config import MergeOptions
    from mergelab.engine import plan_merge

    plan = plan_merge(example_ties, tmp_path / "out", MergeOptions())
    try:
        assert plan.method is METHODS["ties"]
        assert plan.base.ref == "models/base"
        assert [expert.ref for expert in plan.experts] == ["models/expert-copy", "models/expert-sort"]
        tensors = plan.base.reader.tensors
        assert sorted(job.name for job in plan.jobs) == sorted(tensors)
        for job in plan.jobs:
            assert job.shape == tensors[job.name].shape and job.out_dtype == torch.bfloat16
            # weight and density per model (expert-sort overrides density), lambda and normalize global
            assert job.params == {"weight": [1.0, 0.5], "lambda": 1.0, "normalize": True, "density": [0.2, 0.4],
                                  "rescale": False, "keep_ties": True}
    finally:
        plan.close()


def test_example_config_merges_from_the_cli(example_ties, tmp_path):
    import json

    import torch

    from mergelab.io import CheckpointReader

    result = CliRunner().invoke(main, ["merge", str(example_ties), str(tmp_path / "out"), "--quiet", "--seed", "3",
                                       "--shard-size", "30KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # --shard-size reached the writer
    name = "model.layers.0.mlp.up_proj.weight"

    def read(directory: Path) -> torch.Tensor:
        reader = CheckpointReader(directory)
        try:
            return reader.get(name)
        finally:
            reader.close()

    base, copy, sort = (read(tmp_path / "models" / m) for m in ("base", "expert-copy", "expert-sort"))
    expected = METHODS["ties"]([copy, sort], base, weight=[1.0, 0.5], density=[0.2, 0.4], normalize=True,
                               **{"lambda": 1.0})
    merged = read(tmp_path / "out")
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected.to(torch.bfloat16))


def test_methods_command_lists_every_method_with_its_model_count():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    for name in METHODS:
        assert name in result.output
    assert "base_model + exactly 1 other (without base_model, the first listed model is the base)" in result.output
    assert "fisher=PATH*" in result.output and "int8_mask=False (ignored)" in result.output


def test_readme_method_table_states_the_registry_defaults():
    """The README restates each method's parameters; the registry is the source, so they must agree."""
    rows = re.findall(r"^\| `(\w+)` \|[^\n]*\| ([^|\n]*) \| [^|\n]+ \|$", README, flags=re.MULTILINE)
    assert {name for name, _ in rows} == set(METHODS)
    for name, cell in rows:
        stated = {}
        for token in [] if cell == "none" else cell.split(", "):  # "none": a method without parameters
            match = re.fullmatch(r"(\w+)(\*?)(?:=(\S+)| \(path\))", token)
            assert match, (name, token)
            stated[match[1]] = (match[2] == "*", match[3])
        params = {p.name: p for p in METHODS[name].params if not p.ignored}
        assert set(stated) == set(params), name
        for param_name, (per_model, value) in stated.items():
            param = params[param_name]
            assert per_model == param.per_model, (name, param_name)
            if param.tensor_file:
                assert value is None, (name, param_name)
            elif param.required:
                assert value == "required", (name, param_name)
            elif param.kind is bool:
                assert value == str(param.default).lower(), (name, param_name)
            else:
                assert float(value) == param.default, (name, param_name)


@pytest.mark.slow
def test_quick_demo_runs_every_part_and_reports_from_its_own_numbers(tmp_path, monkeypatch):
    import json

    from mergelab.demo import world as world_module

    out = tmp_path / "demo"
    results = run_demo(out, quiet=True, quick=True, cache=tmp_path / "cache")
    report = (out / "report.md").read_text()
    for heading in ("## The demo world", "## 0. Every merge method", "## 1. LM-Cocktail", "## 2. Merging at scale",
                    "## 3. Soup to go (SFA)", "## Verdicts, all claims", "## Reproduce"):
        assert heading in report
    verdicts = ("**reproduced**", "**not reproduced**", "**partly**", "**inconclusive**")
    assert sum(report.count(v) for v in verdicts) >= 14
    for claim in ("forget other tasks", "LM-Cocktail keeps the target", "More experts", "SFA forgets less than",
                  "smaller p", "L2/EWC penalties", "Split digits, class-incremental"):
        assert claim in report, claim
    assert set(results["methods"]["scores"]) >= set(METHODS)
    assert json.loads((out / "results.json").read_text())["world"]["scores"] == results["world"]["scores"]
    base_add = results["world"]["scores"]["base"]["add"]
    assert f"| base | {results['world']['scores']['base']['copy']:.2f} |" in report and base_add >= 0
    for picture in ("cocktail/sweep/sweep.png", "grid/grid.png", "sfa-lm/task_plane.png",
                    "sfa-digits/split_digits_class.png"):
        assert (out / picture).stat().st_size > 1000, picture

    # the world is cached: a second build trains nothing
    monkeypatch.setattr(world_module, "train", lambda *a, **k: pytest.fail("the cached world was rebuilt"))
    from mergelab.demo import QUICK_WORLD

    world_module.build_world(world_module.WorldSettings(**QUICK_WORLD), cache=tmp_path / "cache", log=lambda *_: None)
