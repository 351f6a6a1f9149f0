"""Data-aware methods in the grid (data_aware.py): task records, the DATA_AWARE registry the
runner and the spec validator consult, statistics cached beside the run."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from mergelab.data_aware import DATA_AWARE, task_records
from mergelab.errors import MergelabError
from mergelab.experiments import load_spec, run_grid
from mergelab.lm import make_examples


def test_task_records_read_the_harness_format(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"input": "add 1 2 =", "options": ["4", "3"], "answer": 1}, {"input": "copy 1 =", "output": "1"},
            {"text": "a text"}, "a string", {"input": "x", "options": ["p", "q"], "answer": "p"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert task_records(path) == [{"input": "add 1 2 =", "output": "3", "options": ["4", "3"]},
                                  {"input": "copy 1 =", "output": "1"}, {"input": "a text"}, {"input": "a string"},
                                  {"input": "x", "output": "p", "options": ["p", "q"]}]
    assert len(task_records(path, 2)) == 2
    path.write_text(json.dumps({"input": "x", "options": ["p"], "answer": 3}) + "\n")
    with pytest.raises(MergelabError, match="record 1: 'answer' must index 'options'"):
        task_records(path)


@pytest.fixture
def grid_spec(world, tmp_path):
    tasks, experts = [], []
    for name, skill, model in (("tA", "copy", "a"), ("tB", "reverse", "b")):
        tasks.append({"name": name, "kind": "loss", "category": "seq", "split": "held_in",
                      "examples": make_examples(skill, 4, seed=len(tasks))})
        train = tmp_path / f"{name}.train.jsonl"
        train.write_text("".join(json.dumps(e) + "\n" for e in make_examples(skill, 8, seed=10)))
        experts.append({"name": f"e{model}", "model": world[model], "task": name, "train": train.name})
    tasks.append({"name": "tX", "kind": "loss", "category": "other", "split": "held_out",
                  "examples": make_examples("sort", 4, seed=9)})
    (tmp_path / "tasks.yml").write_text(yaml.safe_dump({"tasks": tasks}))
    spec = {"base": world["base"], "experts": experts, "n_experts": [2], "seeds": [0, 1], "tasks": "tasks.yml",
            "methods": [{"name": "regmean", "merge_method": "regmean", "parameters": {"alpha": 0.9, "examples": 8}},
                        {"name": "ada", "merge_method": "adamerging",
                         "parameters": {"mode": "layer", "steps": 2, "lr": 0.01, "batch_size": 4}}]}
    path = tmp_path / "grid.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_a_grid_runs_regmean_and_adamerging_with_cached_statistics(grid_spec, tmp_path, monkeypatch, one_thread):
    computed = []
    from mergelab import grams

    original = grams.regmean_stats
    monkeypatch.setattr(grams, "regmean_stats", lambda *a, **k: computed.append(a[0]) or original(*a, **k))
    out = tmp_path / "out"
    run_grid(grid_spec, out, workers=1, log=lambda *_: None)
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for method in ("regmean", "ada"):
        cells = [r for r in rows if r["method"] == method]
        assert {(r["seed"], r["task"]) for r in cells} == {(s, t) for s in "01" for t in ("tA", "tB", "tX")}
        assert all(float(r["score"]) > 0 for r in cells)
    stats = sorted(p.name for p in (out / "stats").iterdir())
    assert len(stats) == 2 and stats[0].startswith("ea-") and stats[1].startswith("eb-")
    assert len(computed) == 2  # once per expert, reused by the second seed's cell


def test_the_spec_refuses_a_data_aware_method_when_an_expert_has_no_train_split(grid_spec):
    spec = yaml.safe_load(grid_spec.read_text())
    del spec["experts"][1]["train"]
    grid_spec.write_text(yaml.safe_dump(spec))
    with pytest.raises(MergelabError, match="method 'regmean' .* expert 'eb' has no train split; add train: PATH"):
        load_spec(grid_spec)


def test_the_spec_checks_data_aware_parameters_before_any_work(grid_spec):
    spec = yaml.safe_load(grid_spec.read_text())
    spec["methods"][1]["parameters"]["mode"] = "blocks"
    grid_spec.write_text(yaml.safe_dump(spec))
    with pytest.raises(MergelabError, match="method 'ada': adamerging mode 'blocks' is not known"):
        load_spec(grid_spec)
    spec["methods"][1]["parameters"] = {"stepz": 3}
    grid_spec.write_text(yaml.safe_dump(spec))
    with pytest.raises(MergelabError, match="method 'ada' \\(adamerging\\) has no parameter 'stepz'"):
        load_spec(grid_spec)


def test_every_data_aware_method_names_its_paper_and_parameters():
    for name, method in DATA_AWARE.items():
        assert method.name == name and method.paper
        assert len({p.name for p in method.params}) == len(method.params)
