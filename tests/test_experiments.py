"""The grid runner: picks, results contract, normalization, resume, errors, Ray."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import save_model

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.lm import make_examples, tiny_llama
from mergelab.experiments import RESULT_COLUMNS, load_spec, pick_experts, plan_cells, run_grid
from mergelab.experiments import runner as grid_runner


@pytest.fixture
def spec_file(world, tmp_path):
    tasks = []
    for name, skill, split, category in [("tA", "copy", "held_in", "seq"), ("tB", "reverse", "held_in", "seq"),
                                         ("tC", "sort", "held_in", "order"), ("tX", "copy", "held_out", "other"),
                                         ("tY", "sort", "held_out", "misc")]:
        tasks.append({"name": name, "kind": "loss", "category": category, "split": split,
                      "examples": make_examples(skill, 6, seed=len(tasks))})
    (tmp_path / "tasks.yml").write_text(yaml.safe_dump({"tasks": tasks}))
    spec = {
        "base": world["base"],
        "experts": [{"name": "ea", "model": world["a"], "task": "tA"}, {"name": "eb", "model": world["b"], "task": "tB"},
                    {"name": "ec", "model": world["c"], "task": "tC"}],
        "methods": [{"name": "avg", "merge_method": "linear"},
                    {"name": "ties", "merge_method": "ties", "parameters": {"density": 0.5}}],
        "n_experts": [1, 2], "seeds": [0, 1], "tasks": "tasks.yml", "multitask": world["c"],
    }
    path = tmp_path / "grid.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_picks_are_deterministic_nested_and_shared_across_methods(spec_file):
    names = ["a", "b", "c", "d", "e"]
    assert pick_experts(names, 3, seed=4) == pick_experts(list(reversed(names)), 3, seed=4)
    assert pick_experts(names, 2, seed=4) == pick_experts(names, 3, seed=4)[:2]
    cells = plan_cells(load_spec(spec_file))
    assert len(cells) == 2 * 2 * 2
    for n in (1, 2):
        for seed in (0, 1):
            assert len({c.experts for c in cells if c.n_experts == n and c.seed == seed}) == 1


def test_grid_writes_the_results_contract_and_normalizes(spec_file, tmp_path):
    out = tmp_path / "out"
    run_grid(spec_file, out, workers=1, log=lambda *_: None)
    rows = read(out / "results.csv")
    assert tuple(rows[0].keys()) == RESULT_COLUMNS
    base = {r["task"]: float(r["score"]) for r in rows if r["method"] == "base"}
    expert = {r["task"]: float(r["score"]) for r in rows if r["method"] == "expert"}
    assert set(base) == {"tA", "tB", "tC", "tX", "tY"} and set(expert) == {"tA", "tB", "tC"}
    assert {r["task"] for r in rows if r["method"] == "multitask"} == set(base)
    for row in rows:
        if row["method"] in ("avg", "ties"):
            picked = row["experts"].split(";")
            assert len(picked) == int(row["n_experts"])
            reference = expert[row["task"]] if row["split"] == "held_in" else base[row["task"]]
            assert float(row["reference_score"]) == pytest.approx(reference)
            assert float(row["normalized"]) == pytest.approx(reference / float(row["score"]))  # loss: lower is better
    cell_rows = [r for r in rows if r["method"] == "avg" and r["n_experts"] == "1" and r["seed"] == "0"]
    own = {"ea": "tA", "eb": "tB", "ec": "tC"}[cell_rows[0]["experts"]]
    assert {r["task"] for r in cell_rows} == {own, "tX", "tY"}  # held-in = the picked experts' tasks only
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["cells"]) == {"avg", "ties"} and summary["multitask"]["held_in"] > 0
    assert (out / "grid.png").stat().st_size > 1000 and "| avg | 1 |" in (out / "table.md").read_text()
    assert not (out / "models").exists()  # merged models are deleted after evaluation


def test_grid_resumes_done_cells(spec_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_grid(spec_file, out, workers=1, log=lambda *_: None)
    before = read(out / "results.csv")
    calls = []
    original = grid_runner.run_cell
    monkeypatch.setattr(grid_runner, "run_cell", lambda *args, **kw: calls.append(args) or original(*args, **kw))
    run_grid(spec_file, out, workers=1, log=lambda *_: None)
    assert calls == [] and read(out / "results.csv") == before
    kept = [r for r in before if not (r["method"] == "ties" and r["seed"] == "1")]
    from mergelab.evaluate import write_rows

    write_rows(kept, out / "results.csv", RESULT_COLUMNS)
    run_grid(spec_file, out, workers=1, log=lambda *_: None)
    assert len(calls) == 2  # ties × n ∈ {1, 2} for seed 1
    assert len(read(out / "results.csv")) == len(before)


@pytest.mark.parametrize("change,match", [
    (lambda s: s["experts"][0].update(model="/nope"), "does not exist"),
    (lambda s: s.update(n_experts=[4]), "only 3"),
    (lambda s: s["experts"][1].update(name="ea"), "unique"),
    (lambda s: s["experts"][0].update(task="tX"), "must be held_in"),
    (lambda s: s["experts"][0].update(task="zz"), "does not define"),
    (lambda s: s["methods"].append({"name": "avg", "merge_method": "ties"}), "unique name"),
    (lambda s: s["methods"].append({"name": "x", "merge_method": "slerp"}), "cannot merge"),
    (lambda s: s.update(colour="red"), "colour"),
    (lambda s: s["methods"].append({"name": "x", "preset": "ties-papr"}), "did you mean 'ties-paper'"),
    (lambda s: s["methods"].append({"name": "x", "merge_method": "linear", "preset": "ties-paper"}),
     "setting of ties, not of linear"),
    (lambda s: s["methods"].append({"name": "x"}), "needs merge_method"),
    (lambda s: s["methods"].append({"name": "x", "merge_method": "ties", "parameters": {"densty": 0.2}}),
     "no parameter 'densty'"),
    (lambda s: s["methods"].append({"name": "x", "preset": "ties-paper", "parameters": {"density": 1.5}}),
     "'density' of method 'x'"),
    (lambda s: (s.update(n_experts=[1]), s["methods"].append({"name": "x", "merge_method": "nearswap"})),
     "needs parameter 't'"),
])
def test_bad_specs_are_refused_before_any_merge(spec_file, change, match):
    spec = yaml.safe_load(spec_file.read_text())
    change(spec)
    spec_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(MergelabError, match=match):
        load_spec(spec_file)


def test_a_preset_gives_the_papers_setting_for_each_cell_and_parameters_override_it(spec_file):
    spec = yaml.safe_load(spec_file.read_text())
    spec["methods"] = [{"name": "ties-paper", "preset": "ties-paper"},
                       {"name": "ta", "preset": "task_arithmetic-mean", "parameters": {"weight": 0.5}},
                       {"name": "dare", "preset": "dare_ties-paper", "parameters": {"lambda": 0.8}}]
    spec_file.write_text(yaml.safe_dump(spec))
    grid = load_spec(spec_file)
    assert [m.merge_method for m in grid.methods] == ["ties", "task_arithmetic", "dare_ties"]
    ties = grid_runner.merge_config(grid, "ties-paper", ("ea", "eb"))
    assert ties["merge_method"] == "ties" and ties["base_model"] == grid.base
    assert ties["parameters"] == {"density": 0.2, "lambda": 1.0, "weight": 1.0}  # weight: the grid's equal weights
    assert grid_runner.merge_config(grid, "ta", ("ea",))["parameters"] == {"lambda": 1.0, "weight": 0.5}
    assert grid_runner.merge_config(grid, "ta", ("ea", "eb"))["parameters"] == {"lambda": 0.5, "weight": 0.5}
    assert grid_runner.merge_config(grid, "dare", ("ea", "eb"))["parameters"] == {
        "density": 0.1, "lambda": 0.8, "weight": 1.0}


def test_tasks_without_category_or_split_are_refused(spec_file):
    tasks_path = spec_file.parent / "tasks.yml"
    tasks = yaml.safe_load(tasks_path.read_text())
    del tasks["tasks"][3]["split"]
    tasks_path.write_text(yaml.safe_dump(tasks))
    with pytest.raises(MergelabError, match="task 'tX' has no split"):
        load_spec(spec_file)


def test_grid_cli(spec_file, tmp_path):
    result = CliRunner().invoke(main, ["grid", str(spec_file), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "held-in" in result.stdout
    bad = CliRunner().invoke(main, ["grid", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "either a SPEC" in bad.output


@pytest.mark.slow
def test_grid_cells_in_worker_processes_give_the_sequential_results(spec_file, tmp_path):
    """Each cell has its own seed (DARE-TIES' masks included), so two workers write the very
    results.csv, table and summary that one process writes."""
    spec = yaml.safe_load(spec_file.read_text())
    spec["methods"].append({"name": "dare", "merge_method": "dare_ties", "parameters": {"density": 0.5}})
    spec_file.write_text(yaml.safe_dump(spec))
    run_grid(spec_file, tmp_path / "one", workers=1, log=lambda *_: None)
    run_grid(spec_file, tmp_path / "two", workers=2, log=lambda *_: None)
    for name in ("results.csv", "table.md", "summary.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    dare = [r for r in read(tmp_path / "two" / "results.csv") if r["method"] == "dare"]
    assert len(dare) > 0 and len({r["score"] for r in dare}) > 1


@pytest.mark.slow
def test_a_cell_failing_in_a_worker_is_the_same_error_and_leaves_nothing(spec_file, tmp_path):
    """An expert of another width passes the spec's checks (a model directory) and fails in its
    cell's merge plan, inside a worker: the parent raises that MergelabError, word for word."""
    wide = save_model(tiny_llama(hidden=96, seed=3), tmp_path / "wide")
    spec = yaml.safe_load(spec_file.read_text())
    spec["experts"][1]["model"] = str(wide)
    spec.update(methods=spec["methods"][:1], n_experts=[3], seeds=[0], multitask=None)
    spec_file.write_text(yaml.safe_dump(spec))
    errors = []
    for workers in (1, 2):
        with pytest.raises(MergelabError) as caught:
            run_grid(spec_file, tmp_path / f"w{workers}" / "grid", workers=workers, log=lambda *_: None)
        errors.append(str(caught.value))
        grid = tmp_path / f"w{workers}" / "grid"  # the reference rows, to resume from; no merge left behind
        assert [str(p.relative_to(grid)) for p in grid.rglob("*") if not p.is_dir()] == ["results.csv"]
        assert {r["method"] for r in read(grid / "results.csv")} == {"base", "expert"}
    assert errors[0] == errors[1] and "shape" in errors[0]


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_a_bad_worker_count_is_refused_before_any_work(spec_file, tmp_path, workers):
    with pytest.raises(MergelabError, match="workers must be a whole number of processes, 1 or more"):
        run_grid(spec_file, tmp_path / "out", workers=workers, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["grid", str(spec_file), "--out", str(tmp_path / "cli"), "--workers", "0"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --workers must be") and not (tmp_path / "cli").exists()


@pytest.mark.slow
def test_ray_executor_matches_local(spec_file, tmp_path):
    spec = yaml.safe_load(spec_file.read_text())
    spec.update(n_experts=[2], seeds=[0], methods=spec["methods"][:1], multitask=None)
    spec_file.write_text(yaml.safe_dump(spec))
    run_grid(spec_file, tmp_path / "local", log=lambda *_: None)
    run_grid(spec_file, tmp_path / "ray", executor="ray", log=lambda *_: None)
    local, remote = read(tmp_path / "local" / "results.csv"), read(tmp_path / "ray" / "results.csv")
    assert len(local) == len(remote)
    for a, b in zip(local, remote):
        assert a["task"] == b["task"] and float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-6)


def test_a_merge_scoring_zero_accuracy_is_normalized_to_zero_in_csv_and_table(spec_file, tmp_path, monkeypatch):
    """results.csv and table.md follow one rule: accuracy 0 against a non-zero reference is 0, not blank."""
    tasks_path = spec_file.parent / "tasks.yml"
    items = [{"input": f"copy {d} =", "options": [f"{d}", f"{(d + 1) % 10}"], "answer": 0} for d in range(4)]
    tasks = yaml.safe_load(tasks_path.read_text())
    for task in tasks["tasks"]:
        task.update(kind="rank_classification", examples=items)
    tasks_path.write_text(yaml.safe_dump(tasks))
    spec = yaml.safe_load(spec_file.read_text())
    spec.update(n_experts=[1], seeds=[0], methods=spec["methods"][:1], multitask=None)
    spec_file.write_text(yaml.safe_dump(spec))
    original = grid_runner.evaluate_models

    def references_score_half_merges_zero(model_dirs, tasks, **kwargs):
        rows = original(model_dirs, tasks, **kwargs)
        merged = "models" in str(model_dirs[0])
        return [{**row, "score": 0.0 if merged else 0.5} for row in rows]

    monkeypatch.setattr(grid_runner, "evaluate_models", references_score_half_merges_zero)
    out = tmp_path / "zero"
    run_grid(spec_file, out, workers=1, log=lambda *_: None)  # in this process, where the patch is
    merged_rows = [r for r in read(out / "results.csv") if r["method"] == "avg"]
    assert merged_rows and all(r["normalized"] == "0.0" and r["reference_score"] == "0.5" for r in merged_rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"]["avg"]["1"] == {split: {"mean": 0.0, "std": 0.0, "seeds": 1}
                                            for split in ("held_in", "held_out")}
    assert "| avg | 1 | 0.000 ± 0.000 | 0.000 ± 0.000 | 1 |" in (out / "table.md").read_text()


def test_undefined_normalized_scores_stay_blank():
    from mergelab.evaluate import make_task

    tasks = [make_task({"name": "acc", "kind": "loss", "metric": "loss", "split": "held_out", "category": "c",
                        "examples": [{"text": "copy 1"}]})]
    rows = [{"method": "base", "task": "acc", "split": "held_out", "score": 0.0},
            {"method": "avg", "task": "acc", "split": "held_out", "score": 0.0}]
    grid_runner.add_normalized(rows, tasks)
    assert [r["normalized"] for r in rows] == ["", ""]  # a loss of 0 has no normalized value
    assert rows[1]["reference_score"] == 0.0
