"""`mergelab sfa`: the YAML spec and its errors, a stream of tiny-Llama tasks and the
split-digits experiment through the CLI, and all-or-nothing result directories."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import read_only_dir

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.continual import load_stream_spec, run_spec
from mergelab.studies.digits import run_digits_experiment
from mergelab.continual.stream import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_spec(**overrides) -> dict:
    spec = {
        "model": "tiny",
        "tasks": [{"name": "copy", "demo": "copy", "train_size": 64, "eval_size": 16},
                  {"name": "reverse", "demo": "reverse", "train_size": 64, "eval_size": 16}],
        "methods": ["sequential", {"method": "sfa", "p": [1, 0.5], "beta": 0.5}, "rehearsal", "multitask",
                    {"method": "l2", "lambda": 0.01}, {"method": "ewc", "lambda": 1.0, "fisher_samples": 8},
                    "task_arithmetic"],
        "steps": 6, "batch_size": 8, "lr": 0.003,
    }
    spec.update(overrides)
    return spec


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "stream.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# -- the spec -----------------------------------------------------------------------------------
def test_sweeps_expand_into_one_method_each():
    methods = load_stream_spec(tiny_spec(methods=[{"method": "sfa", "p": [1, 0.25], "beta": [0.3, 0.5]}])).all_methods()
    assert [(m.p, m.beta) for m in methods] == [(1, 0.3), (1, 0.5), (0.25, 0.3), (0.25, 0.5)]
    single = load_stream_spec(tiny_spec(methods=[], method="sfa", p=0.25, beta=0.5)).all_methods()
    assert [(m.name, m.p, m.beta) for m in single] == [("sfa", 0.25, 0.5)]


def test_the_example_spec_is_valid():
    methods = load_stream_spec(ROOT / "examples" / "sfa_tiny.yml").all_methods()
    assert {m.name for m in methods} >= {"sequential", "sfa", "rehearsal", "multitask", "task_arithmetic"}


@pytest.mark.parametrize("overrides, message", [
    ({"tasks": []}, "the task list is empty"),
    ({"methods": [{"method": "sfa", "p": 0}]}, r"SFA p must be in \(0, 1\]"),
    ({"methods": [{"method": "sfa", "p": [0.5, 1.5]}]}, r"SFA p must be in \(0, 1\].*got 1.5"),
    ({"methods": [{"method": "sfa", "beta": 1.5}]}, r"SFA beta must be in \[0, 1\]"),
    ({"methods": ["finetune"]}, "unknown continual method 'finetune'"),
    ({"methods": [{"method": "l2", "p": 0.5}]}, "method 'l2' does not use p"),
    ({"methods": [], "p": 0.5}, "no 'method'"),
    ({"methods": []}, "names no method"),
    ({"steps": [5]}, "steps lists 1 numbers for 2 tasks"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"tasks": [{"name": "a", "demo": "copy", "train": "a.jsonl"}]}, "exactly one of train"),
    ({"batch_size": 0}, "batch_size"),
    ({"optimizer": "lion"}, "optimizer must be adamw or sgd"),
    ({"unknown_key": 1}, "unknown_key"),
])
def test_spec_errors_name_the_problem(overrides, message):
    with pytest.raises(MergelabError, match=message):
        load_stream_spec(tiny_spec(**overrides))


def test_task_files_are_checked(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"input": "copy 1 =", "answer": "1"}\n')
    spec = tiny_spec(tasks=[{"name": "a", "data": "bad.jsonl"}])
    with pytest.raises(MergelabError, match="example 0 must be an object with string fields 'input' and 'output'"):
        run_spec(write_spec(tmp_path, spec), tmp_path / "out")
    spec = tiny_spec(tasks=[{"name": "a", "train": "missing.jsonl", "eval": "missing.jsonl"}])
    with pytest.raises(MergelabError, match="task file .*missing.jsonl does not exist"):
        run_spec(write_spec(tmp_path, spec), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- running through the CLI --------------------------------------------------------------------
def test_cli_runs_a_stream_and_writes_json_table_and_plot(tmp_path):
    result = CliRunner().invoke(main, ["sfa", str(write_spec(tmp_path, tiny_spec())), "--out", str(tmp_path / "out"),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["copy", "reverse"]
    assert [run["label"] for run in results["runs"]] == [
        "sequential", "SFA p=1 β=0.5", "SFA p=0.5 β=0.5", "rehearsal 10%", "multitask", "L2 λ=0.01", "EWC λ=1",
        "task arithmetic"]
    for run in results["runs"]:
        assert len(run["accuracy_matrix"]) == 2 and len(run["l2_distance"][1]) == 1
        assert {"average_accuracy", "forgetting", "bwt"} <= set(run)
    assert results["spec"]["methods"][1] == {"method": "sfa", "p": [1, 0.5], "beta": 0.5}  # as the spec said
    assert "| SFA p=0.5 β=0.5 |" in (out / "results.md").read_text()
    assert (out / "task_plane.png").read_bytes().startswith(PNG)


def test_tasks_from_files_and_scores_from_mergelab_evaluate(tmp_path):
    from mergelab.lm import make_examples

    def jsonl(name, examples):
        (tmp_path / name).write_text("".join(json.dumps(e) + "\n" for e in examples))

    jsonl("copy.train.jsonl", make_examples("copy", 32, 1))
    jsonl("copy.eval.jsonl", make_examples("copy", 8, 2))
    jsonl("sort.jsonl", make_examples("sort", 40, 3))
    eval_tasks = [{"name": name, "kind": "generation", "metric": "exact_match",
                   "examples": make_examples(skill, 4, 9), "options": {"max_new_tokens": 8}}
                  for name, skill in (("copy", "copy"), ("sort", "sort"))]
    (tmp_path / "eval.yml").write_text(yaml.safe_dump({"tasks": eval_tasks}))
    spec = tiny_spec(tasks=[{"name": "copy", "train": "copy.train.jsonl", "eval": "copy.eval.jsonl"},
                            {"name": "sort", "data": "sort.jsonl", "eval_fraction": 0.25}],
                     methods=[{"method": "sfa", "p": 0.5}], steps=[4, 3], evaluation="eval.yml")
    out = run_spec(write_spec(tmp_path, spec), tmp_path / "out", quiet=True)
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert all(0.0 <= score <= 1.0 for row in run["accuracy_matrix"] for score in row)


def test_an_evaluation_task_where_lower_is_better_is_refused(tmp_path):
    from mergelab.lm import make_examples

    eval_tasks = [{"name": name, "kind": "loss", "examples": make_examples("copy", 2, 0)}
                  for name in ("copy", "reverse")]
    (tmp_path / "eval.yml").write_text(yaml.safe_dump({"tasks": eval_tasks}))
    with pytest.raises(MergelabError, match="uses loss, where lower is better"):
        run_spec(write_spec(tmp_path, tiny_spec(evaluation="eval.yml")), tmp_path / "out", quiet=True)


def test_cli_errors_exit_2_without_a_traceback(tmp_path):
    runner = CliRunner()
    neither = runner.invoke(main, ["sfa", "--out", str(tmp_path / "out")])
    assert neither.exit_code == 2 and "error: give either a SPEC file or --digits" in neither.output
    bad = runner.invoke(main, ["sfa", str(write_spec(tmp_path, tiny_spec(methods=[{"method": "sfa", "beta": 2}]))),
                               "--out", str(tmp_path / "out")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ")
    assert "stream.yml: SFA beta must be in [0, 1]" in bad.output
    (tmp_path / "taken").mkdir()
    taken = runner.invoke(main, ["sfa", "--digits", "--out", str(tmp_path / "taken")])
    assert taken.exit_code == 2 and "already exists" in taken.output and "Traceback" not in taken.output


def bad_outs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    existing_file = tmp_path / "results.txt"
    existing_file.write_text("not a directory")
    cases = {"an existing file": (existing_file, r"output path .*results.txt exists and is not a directory")}
    if read_only_dir() is not None:
        cases["a read-only place"] = (read_only_dir() / "mergelab-sfa",
                                      r"cannot write .*mergelab-sfa: .* is not writable")
    return cases


def listing(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("case", ["an existing file", "a read-only place"])
@pytest.mark.parametrize("digits", [False, True], ids=["spec", "digits"])
def test_a_bad_out_is_refused_before_any_training(tmp_path, monkeypatch, case, digits):
    cases = bad_outs(tmp_path)
    if case not in cases:
        pytest.skip("no read-only file system here")
    out, message = cases[case]
    monkeypatch.setattr("mergelab.continual.lm.run_stream", lambda *a, **k: pytest.fail("trained before the check"))
    monkeypatch.setattr("mergelab.studies.digits.worker_pool", lambda *a, **k: pytest.fail("started workers"))
    monkeypatch.setattr("mergelab.studies.digits.run_seed", lambda *a, **k: pytest.fail("trained"))
    spec = write_spec(tmp_path, tiny_spec())
    before = listing(tmp_path)
    with pytest.raises(MergelabError, match=message):
        run_digits_experiment(out, quiet=True) if digits else run_spec(spec, out, quiet=True)
    source = ["--digits"] if digits else [str(spec)]
    result = CliRunner().invoke(main, ["sfa", *source, "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.match(r"error: [^\n]*" + message, result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert listing(tmp_path) == before


@pytest.mark.slow
def test_a_bad_out_through_the_console_script(tmp_path):
    script = ROOT / ".venv" / "bin" / "mergelab"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mergelab.cli"]
    for out, message in bad_outs(tmp_path).values():
        done = subprocess.run([*command, "sfa", "--digits", "--out", str(out), "--quiet"], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and re.match(r"error: [^\n]*" + message, done.stderr), done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_failure_leaves_no_half_written_results(tmp_path, monkeypatch):
    import mergelab.continual.lm as lm

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(lm, "save_plane_figure", broken_plot)
    spec = tiny_spec(methods=["sequential"], steps=2)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_spec(spec, tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its temporary sibling


# -- the split-digits experiment -----------------------------------------------------------------
def test_split_digits_writes_tables_plots_and_a_verdict(tmp_path):
    small = dict(seeds=(0,), settings=TrainSettings(steps=40, batch_size=32, lr=0.05, optimizer="sgd", momentum=0.9),
                 sfa_p=(1.0, 0.25), sfa_beta=(0.25, 0.75), sfa_beta_at_p=(0.25,), l2_lambda=(0.1, 1.0),
                 ewc_lambda=(1e3,))
    out = run_digits_experiment(tmp_path / "digits", quiet=True, **small)
    results = json.loads((out / "results.json").read_text())
    assert set(results["scenarios"]) == {"class", "domain"}
    for scenario in ("class", "domain"):
        result = results["scenarios"][scenario]
        labels = [run["label"] for run in result["runs"]]
        assert labels[:3] == ["sequential", "multitask", "rehearsal 10%"] and "TIES" in labels
        assert {"SFA p=1 β=0.5", "SFA p=0.25 β=0.25", "L2 λ=1", "EWC λ=1000"} <= set(labels)
        assert set(result["comparison"]["best"]) >= {"sfa", "l2", "ewc", "sequential"}
        assert (out / f"split_digits_{scenario}.png").read_bytes().startswith(PNG)
    table = (out / "results.md").read_text()
    assert table.count("**Verdict:** SFA's best") == 2 and "| SFA p=0.25 β=0.75 |" in table


@pytest.mark.slow
def test_the_full_split_digits_experiment_through_the_cli(tmp_path):
    result = CliRunner().invoke(main, ["sfa", "--digits", "--out", str(tmp_path / "digits"), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "digits" / "results.json").read_text())
    for result in results["scenarios"].values():
        assert result["seeds"] == [0, 1, 2, 3, 4] and len(result["runs"]) == 32
        best = result["comparison"]["best"]
        assert best["multitask"]["average_accuracy"] > 0.9  # the upper baseline learns both halves
        assert best["sequential"]["average_accuracy"] < best["sfa"]["average_accuracy"]


# -- the README's SFA section ----------------------------------------------------------------------
def readme_sfa_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Keep old skills while fine-tuning: SFA"):]
    return section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section  # up to the next section


def test_readme_sfa_python_example_runs():
    import re

    snippet = re.findall(r"```python\n(.*?)```", readme_sfa_section(), flags=re.DOTALL)[0]
    namespace: dict = {}
    exec(snippet, namespace)
    assert namespace["sfa"].averaged_at == [25, 50, 75, 100]


def test_readme_sfa_commands_are_the_tested_ones():
    import re
    import shlex

    commands = [shlex.split(line.split("#")[0]) for block in
                re.findall(r"```bash\n(.*?)```", readme_sfa_section(), flags=re.DOTALL) for line in block.splitlines()]
    assert commands == [["mergelab", "sfa", "examples/sfa_tiny.yml", "--out", "sfa-tiny"],
                        ["mergelab", "sfa", "--digits", "--out", "sfa-digits"],
                        # the study's own tests run these (tests/test_study_sfa.py, tests/test_demo_evidence.py)
                        ["mergelab", "study", "sfa", "--out", "study/sfa", "--workers", "2"],
                        ["mergelab", "study", "sfa", "--out", "/tmp/sfa-quick", "--quick"],
                        ["mergelab", "demo", "--study", "study"]]
    assert (ROOT / commands[0][2]).is_file()  # loaded by test_the_example_spec_is_valid; --digits runs above
