"""Hostile inputs to `eval`, `cocktail merge|weights|sweep` and `grid`: each is one `error:` line
(at most followed by indented hints) on stderr, exit 2, no traceback, nothing left behind, and
the same error through the Python API. One real console-script run per command family."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.cocktail import alpha_sweep, cocktail, load_examples
from mergelab.lm import build_tokenizer, make_examples, tiny_llama
from mergelab.evaluate import evaluate_models
from mergelab.experiments import run_grid

from conftest import read_only_dir

FIVE = make_examples("copy", 5, seed=21, length=(2, 4))
GOOD_LINE = json.dumps(FIVE[0])
BAD_JSONL = f"{GOOD_LINE}\n{GOOD_LINE}\n{{\"input\": \"copy 1 =\", \"output\": }}\n"


class Opaque:
    """Any non-tensor object a pickled checkpoint may carry."""


@pytest.fixture(scope="module")
def hostile(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """Good and broken models, examples and tasks files, built once."""
    root = tmp_path_factory.mktemp("hostile")
    paths = {"base": tiny_world["base"], "peer": tiny_world["a"]}
    paths["no_tokenizer"] = root / "no_tokenizer"
    paths["no_tokenizer"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_world["base"] / name, paths["no_tokenizer"] / name)
    paths["pickled"] = root / "pickled"
    model = tiny_llama(seed=0)
    model.config.save_pretrained(paths["pickled"])
    build_tokenizer().save_pretrained(paths["pickled"])
    torch.save({**model.state_dict(), "extra": Opaque()}, paths["pickled"] / "pytorch_model.bin")
    paths["no_model"] = root / "no_model"
    paths["no_model"].mkdir()
    paths["missing"] = root / "missing"
    files = {"examples.jsonl": "\n".join(json.dumps(e) for e in FIVE), "bad_line3.jsonl": BAD_JSONL,
             "empty.jsonl": "", "task_data_bad.jsonl": BAD_JSONL,
             "no_output.jsonl": f"{GOOD_LINE}\n{json.dumps({'input': 'copy 1 ='})}\n",
             "tasks.yml": yaml.safe_dump({"tasks": [
                 {"name": "copy", "kind": "loss", "split": "held_in", "category": "c", "examples": FIVE},
                 {"name": "other", "kind": "loss", "split": "held_out", "category": "d", "examples": FIVE}]}),
             "tasks_bad_data.yml": yaml.safe_dump({"tasks": [{"name": "copy", "kind": "loss",
                                                              "data": "task_data_bad.jsonl"}]}),
             "tasks_empty.yml": "",
             "tasks_number_input.yml": yaml.safe_dump({"tasks": [{"name": "n", "kind": "loss",
                                                                  "examples": [{"input": 5, "output": "1"}]}]}),
             "tasks_option_typo.yml": yaml.safe_dump({"tasks": [{"name": "g", "kind": "generation", "examples": FIVE,
                                                                 "options": {"max_new_token": 3}}]})}
    for name, text in files.items():
        (root / name).write_text(text)
        paths[name] = root / name
    paths["a_file"] = root / "examples.jsonl"
    paths["foreign_out"] = root / "foreign_out"  # an earlier output directory holding someone else's results.csv
    paths["foreign_out"].mkdir()
    (paths["foreign_out"] / "results.csv").write_text("name,value\nx,1\n")
    return paths


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert all(line.startswith("  ") for line in lines[1:]), stderr  # further lines are indented hints
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr


def snapshot(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


# -- the corpus: (case, command-line, fragments the error must contain) -------------------------
def eval_cases(p):
    tasks = ["--tasks", p["tasks.yml"]]
    return {
        "missing model": (["eval", p["missing"], *tasks], [str(p["missing"]), "does not exist"]),
        "no tokenizer": (["eval", p["no_tokenizer"], *tasks], [f"{p['no_tokenizer']} has no tokenizer",
                                                               "--tokenizer PATH"]),
        "pickled .bin": (["eval", p["pickled"], *tasks], [str(p["pickled"] / "pytorch_model.bin"),
                                                          "not a plain tensor checkpoint", "safetensors"]),
        "no model": (["eval", p["no_model"], *tasks], [str(p["no_model"]), "holds no model"]),
        "tasks data bad line 3": (["eval", p["base"], "--tasks", p["tasks_bad_data.yml"]],
                                  [str(p["task_data_bad.jsonl"]), "line 3 column"]),
        "empty tasks file": (["eval", p["base"], "--tasks", p["tasks_empty.yml"]],
                             [f"tasks file {p['tasks_empty.yml']} is empty"]),
        "missing tokenizer option": (["eval", p["no_tokenizer"], *tasks, "--tokenizer", p["missing"]],
                                     [f"tokenizer directory {p['missing']} does not exist"]),
        "number as text": (["eval", p["base"], "--tasks", p["tasks_number_input.yml"]],
                           ["task 'n', example 0: 'input' must be a string"]),
        "option typo": (["eval", p["base"], "--tasks", p["tasks_option_typo.yml"]],
                        ["task 'g': unknown option 'max_new_token'"]),
        "batch size 0": (["eval", p["base"], *tasks, "--batch-size", "0"], ["batch size must be at least 1"]),
        "unknown device": (["eval", p["base"], *tasks, "--device", "gpu"], ["device 'gpu' is not a device"]),
        "out is a directory": (["eval", p["base"], *tasks, "--out", p["no_model"]],
                               [f"results path {p['no_model']} is a directory"]),
        "read-only out": (["eval", p["base"], *tasks, "--out", "/sys/kernel/results.csv"],
                          ["cannot write results path /sys/kernel/results.csv"]),
    }


def cocktail_cases(p, out):
    models = ["--base", p["base"], "--peer", p["peer"]]
    return {
        "examples bad line 3": (["cocktail", "weights", *models, "--examples", p["bad_line3.jsonl"]],
                                [f"examples file {p['bad_line3.jsonl']}, line 3 column"]),
        "empty examples": (["cocktail", "weights", *models, "--examples", p["empty.jsonl"]],
                           [f"examples file {p['empty.jsonl']} is empty"]),
        "example without output": (["cocktail", "weights", *models, "--examples", p["no_output.jsonl"]],
                                   [f"examples file {p['no_output.jsonl']}, example 1 is missing 'output'"]),
        "missing examples": (["cocktail", "merge", out, *models, "--examples", p["missing"]],
                             [str(p["missing"]), "does not exist"]),
        "candidate without tokenizer": (["cocktail", "merge", out, "--base", p["no_tokenizer"], "--peer", p["peer"],
                                         "--examples", p["examples.jsonl"]],
                                        [f"{p['no_tokenizer']} has no tokenizer", "--tokenizer PATH"]),
        "pickled candidate": (["cocktail", "weights", "--base", p["pickled"], "--peer", p["peer"],
                               "--examples", p["examples.jsonl"]], ["not a plain tensor checkpoint"]),
        "missing candidate": (["cocktail", "weights", "--base", p["missing"], "--peer", p["peer"],
                               "--examples", p["examples.jsonl"]], [str(p["missing"]), "does not exist"]),
        "sweep with bad examples": (["cocktail", "sweep", out, "--finetuned", p["peer"], *models[:2],
                                     "--examples", p["bad_line3.jsonl"], "--tasks", p["tasks.yml"],
                                     "--target", "copy", "--alphas", "0,1"], ["line 3 column"]),
        "loss option out of range": (["cocktail", "weights", *models, "--examples", p["examples.jsonl"],
                                      "--max-length", "0"], ["max_length must be at least 1"]),
        "sweep on an unknown device": (["cocktail", "sweep", out, "--finetuned", p["peer"], *models[:2], "--examples",
                                        p["examples.jsonl"], "--tasks", p["tasks.yml"], "--target", "copy",
                                        "--device", "gpu"], ["device 'gpu' is not a device"]),
        "sweep with candidate lacking a tokenizer": (
            ["cocktail", "sweep", out, "--finetuned", p["peer"], "--base", p["no_tokenizer"], "--examples",
             p["examples.jsonl"], "--tasks", p["tasks.yml"], "--target", "copy"], ["has no tokenizer"]),
    }


def grid_spec(p, tmp_path: Path, **changes) -> Path:
    spec = {"base": str(p["base"]), "experts": [{"name": "ea", "model": str(p["peer"]), "task": "copy"}],
            "methods": [{"name": "avg", "merge_method": "linear"}], "n_experts": [1], "seeds": [0],
            "tasks": str(p["tasks.yml"]), **changes}
    path = tmp_path / f"grid-{len(list(tmp_path.glob('grid-*.yml')))}.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


def grid_cases(p, tmp_path, out):
    read_only = Path("/sys/kernel/mergelab-grid")  # read-only even for root
    return {
        "out is a file": (["grid", grid_spec(p, tmp_path), "--out", p["a_file"]],
                          [f"output path {p['a_file']} exists and is not a directory"]),
        "out under a file": (["grid", grid_spec(p, tmp_path), "--out", p["a_file"] / "sub"],
                             [f"cannot create {p['a_file'] / 'sub'}: {p['a_file']} is a file"]),
        "read-only out": (["grid", grid_spec(p, tmp_path), "--out", read_only],
                          [f"cannot write {read_only}: /sys/kernel is not writable"]),
        "out inside an input model": (["grid", grid_spec(p, tmp_path), "--out", p["base"] / "grid"],
                                      [f"lies inside input model {p['base']}"]),
        "foreign results.csv": (["grid", grid_spec(p, tmp_path), "--out", p["foreign_out"]],
                                [f"{p['foreign_out'] / 'results.csv'} is not the results file of a grid"]),
        "expert without tokenizer": (["grid", grid_spec(p, tmp_path, base=str(p["no_tokenizer"])), "--out", out],
                                     [f"{p['no_tokenizer']} has no tokenizer"]),
        "tasks with bad data": (["grid", grid_spec(p, tmp_path, tasks=str(p["tasks_bad_data.yml"])), "--out", out],
                                ["line 3 column"]),
    }


CASES = {"eval": ["missing model", "no tokenizer", "pickled .bin", "no model", "tasks data bad line 3",
                  "empty tasks file", "missing tokenizer option", "number as text", "option typo", "batch size 0",
                  "unknown device", "out is a directory", "read-only out"],
         "cocktail": ["examples bad line 3", "empty examples", "example without output", "missing examples",
                      "candidate without tokenizer", "pickled candidate", "missing candidate",
                      "loss option out of range", "sweep on an unknown device", "sweep with bad examples",
                      "sweep with candidate lacking a tokenizer"],
         "grid": ["out is a file", "out under a file", "read-only out", "out inside an input model",
                  "foreign results.csv", "expert without tokenizer", "tasks with bad data"]}


def cases_for(family, p, tmp_path):
    out = tmp_path / "out"
    if family == "eval":
        return eval_cases(p), out
    if family == "cocktail":
        return cocktail_cases(p, out), out
    return grid_cases(p, tmp_path, out), out


@pytest.mark.parametrize("family,case", [(f, c) for f, names in CASES.items() for c in names])
def test_hostile_input_is_one_error_line_and_leaves_nothing(hostile, tmp_path, family, case, one_thread):
    if case == "read-only out" and read_only_dir() is None:
        pytest.skip("no read-only file system here")
    cases, out = cases_for(family, hostile, tmp_path)
    args, fragments = cases[case]
    before = snapshot(tmp_path)
    code, stderr = run_cli(*args)
    assert code == 2, stderr
    assert_one_error_line(stderr, *fragments)
    assert not out.exists() and snapshot(tmp_path) == before


def test_api_eval_errors(hostile, tmp_path):
    with pytest.raises(MergelabError, match="has no tokenizer"):
        evaluate_models([hostile["base"], hostile["no_tokenizer"]], hostile["tasks.yml"], progress=False)
    with pytest.raises(MergelabError, match="not a plain tensor checkpoint"):
        evaluate_models([hostile["pickled"]], hostile["tasks.yml"], progress=False)
    with pytest.raises(MergelabError, match="line 3 column"):
        evaluate_models([hostile["base"]], hostile["tasks_bad_data.yml"], progress=False)
    rows = evaluate_models([hostile["no_tokenizer"]], hostile["tasks.yml"], progress=False,
                           tokenizer=hostile["base"])  # the fix the error offers
    assert rows == [{**row, "model": str(hostile["no_tokenizer"])}
                    for row in evaluate_models([hostile["base"]], hostile["tasks.yml"], progress=False)]


def test_tokenizer_option_is_refused_where_it_cannot_apply(hostile):
    from mergelab.evaluate.adapters import evaluate_with_backend

    with pytest.raises(MergelabError, match="--tokenizer applies to mergelab's own evaluators only"):
        evaluate_with_backend([hostile["base"]], hostile["tasks.yml"], backend="lm-eval", tokenizer=hostile["base"])


def test_api_cocktail_errors(hostile, tmp_path):
    with pytest.raises(MergelabError, match=r"line 3 column \d+: not valid JSON"):
        load_examples(hostile["bad_line3.jsonl"])
    with pytest.raises(MergelabError, match="has no tokenizer"):
        cocktail(None, base=hostile["no_tokenizer"], peers=[hostile["peer"]], examples=FIVE)
    result = cocktail(None, base=hostile["no_tokenizer"], peers=[hostile["peer"]], examples=FIVE,
                      tokenizer=hostile["base"])
    assert result.weights == pytest.approx(cocktail(None, base=hostile["base"], peers=[hostile["peer"]],
                                                    examples=FIVE).weights)
    with pytest.raises(MergelabError, match="example list is empty"):
        alpha_sweep(tmp_path / "sweep", finetuned=hostile["peer"], base=hostile["base"], examples=[],
                    tasks=hostile["tasks.yml"], target=["copy"], recipe="full")
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_that_fails_midway_removes_the_directories_it_created(hostile, tmp_path):
    def evaluate(model_dir):
        raise MergelabError("scoring failed")

    with pytest.raises(MergelabError, match="scoring failed"):
        alpha_sweep(tmp_path / "new" / "sweep", finetuned=hostile["peer"], base=hostile["base"], evaluate=evaluate,
                    target=["t"], alphas=[0.0])
    assert not (tmp_path / "new").exists()


def test_api_cocktail_checks_the_output_before_computing(hostile, tmp_path, monkeypatch):
    import mergelab.cocktail.recipes as recipes

    monkeypatch.setattr(recipes, "fewshot_losses", lambda *a, **k: pytest.fail("computed before the check"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergelabError, match="already exists"):
        cocktail(tmp_path / "taken", base=hostile["base"], peers=[hostile["peer"]], examples=FIVE)


def test_api_grid_errors(hostile, tmp_path):
    with pytest.raises(MergelabError, match="exists and is not a directory"):
        run_grid(grid_spec(hostile, tmp_path), hostile["a_file"], log=lambda *_: None)
    with pytest.raises(MergelabError, match="lies inside input model"):
        run_grid(grid_spec(hostile, tmp_path), hostile["peer"] / "grid", log=lambda *_: None)
    assert not (hostile["peer"] / "grid").exists()
    with pytest.raises(MergelabError, match="has no tokenizer"):
        run_grid(grid_spec(hostile, tmp_path, base=str(hostile["no_tokenizer"])), tmp_path / "g",
                 log=lambda *_: None)
    assert not (tmp_path / "g").exists()


def test_sweep_has_no_alpha_option(hostile, tmp_path):
    result = CliRunner().invoke(main, ["cocktail", "sweep", str(tmp_path / "s"), "--alpha", "0.3"])
    assert result.exit_code == 2 and "No such option '--alpha'" in result.output


# -- one real console-script run per command family --------------------------------------------
def console(*args) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "mergelab"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("family,case", [("eval", "no tokenizer"), ("cocktail", "sweep with bad examples"),
                                         ("grid", "out is a file")])
def test_console_script(hostile, tmp_path, family, case):
    cases, out = cases_for(family, hostile, tmp_path)
    args, fragments = cases[case]
    proc = console(*args)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, *fragments)
    assert not out.exists()


# -- the reader's line numbers, as a property ----------------------------------------------------
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from(["record", "blank"]), min_size=2, max_size=12), suffix=st.sampled_from(
    [".jsonl", ".json"]), data=st.data())
def test_a_bad_jsonl_line_is_reported_at_its_line_in_the_file(tmp_path, lines, suffix, data):
    lines[0] = "record"  # a JSONL file named .json is known as JSONL by having two or more lines
    lines.append("record")
    bad = data.draw(st.integers(0, len(lines) - 1))
    text = [GOOD_LINE if kind == "record" else "" for kind in lines]
    text[bad] = '{"input": "copy 1 =", "output": '  # cut short
    path = tmp_path / f"examples{suffix}"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(MergelabError, match=rf"examples file {path}, line {bad + 1} column \d+: not valid JSON"):
        load_examples(path)
