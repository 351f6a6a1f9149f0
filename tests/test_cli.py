"""The CLI is thin and the README's commands are true."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergelab.cli import main
from mergelab.demo import run_demo
from mergelab.demo.tiny import TASKS
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


def test_readme_merge_example_runs(tiny_world, tmp_path, monkeypatch):
    """The README's YAML and Python snippets, with its model names pointing at tiny models."""
    models = tmp_path / "models"
    models.mkdir()
    for name, source in {"base": "base", "expert-copy": "a", "expert-sort": "b"}.items():
        shutil.copytree(tiny_world[source], models / name)
    (tmp_path / "merge.yml").write_text(code_blocks("yaml")[0])
    monkeypatch.chdir(tmp_path)
    exec(code_blocks("python")[0], {})
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    result = CliRunner().invoke(main, ["merge", "merge.yml", "merged2", "--quiet", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "merged model written to" in result.output


def test_example_config_is_valid_for_its_method():
    from mergelab.config import load_config

    config = load_config(ROOT / "examples" / "ties.yml")
    assert config.merge_method in METHODS


def test_methods_command_lists_every_method():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    for name in METHODS:
        assert name in result.output


@pytest.mark.slow
def test_demo_merges_with_every_method_and_shows_forgetting(tmp_path):
    summary = run_demo(tmp_path / "demo", quiet=True)
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(METHODS) <= set(rows)
    for task in TASKS:  # each expert learned its skill ...
        assert rows[task][task] > rows["base"][task] + 0.2
    # ... and lost ground on at least one other skill: the forgetting merging is meant to fix
    assert any(rows[task][other] < rows["base"][other] for task in TASKS for other in TASKS if other != task)
    for method in METHODS:
        assert all(0.0 <= rows[method][t] <= 1.0 for t in TASKS)
    assert (tmp_path / "demo" / "merged" / "ties" / "model.safetensors").is_file()
