"""The modern methods in the demo (issue 14): `mergelab grid --demo --methods/--n-experts/--seeds`,
the "modern methods" table and verdicts of `mergelab demo --full`, and the flag reaching run_demo."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.demo import DEMO_PARAMETERS, demo_spec
from mergelab.demo.modern import (MODERN, SEED_FOUR, demo_grid_settings, full_methods, grid_choices, grid_methods,
                                  modern_section, modern_table, modern_verdicts)
from mergelab.evaluate.evidence import compare
from mergelab.experiments.spec import MethodSpec


def no_world(*args, **kwargs):
    pytest.fail("the demo world was built before the options were checked")


# -- grid --demo --methods / --n-experts / --seeds --------------------------------------------------
def test_methods_are_the_grids_four_registry_methods_and_presets_with_the_demos_parameters():
    entries = {e["name"]: e for e in grid_methods(["averaging", "ties", "tsv", "iso_cts", "ties-paper", "della"])}
    assert entries["averaging"] == {"name": "averaging", "merge_method": "linear"}
    assert entries["ties"]["parameters"] == {"density": 0.5, "lambda": 1.0}  # the demo grid's own setting
    assert entries["tsv"] == {"name": "tsv", "merge_method": "tsv"}  # registry defaults (the paper's)
    assert entries["ties-paper"] == {"name": "ties-paper", "preset": "ties-paper"}
    assert entries["della"]["parameters"] == DEMO_PARAMETERS["della"]
    for entry in entries.values():  # every entry is a valid grid method
        MethodSpec.model_validate(entry)


def test_the_default_demo_grid_is_the_seed_papers_four():
    assert [e["name"] for e in grid_methods(SEED_FOUR)] == list(SEED_FOUR)
    assert full_methods()[:4] == SEED_FOUR and {"tsv", "iso_c", "iso_cts"} <= set(full_methods())
    assert set(full_methods()) <= set(SEED_FOUR) | set(MODERN)


def test_choices_leave_out_what_a_grid_over_the_demos_experts_cannot_run():
    choices = grid_choices()
    assert {"averaging", "tsv", "iso_c", "iso_cts", "ties-paper"} <= set(choices)
    assert "slerp" not in choices  # an interpolation between two endpoints
    assert "fisher" not in choices  # needs a Fisher file per expert, which the grid does not make


@pytest.mark.parametrize("methods, message", [
    ("tsv,isoc", r"--methods: 'isoc' is not a method the demo grid can run \(did you mean 'iso_c'\?\)"),
    ("slerp", r"'slerp' is not a method the demo grid can run"),
    (",", r"--methods names no method"),
])
def test_an_unusable_method_is_refused_with_the_choices_before_the_world_is_built(monkeypatch, tmp_path, methods,
                                                                                     message):
    monkeypatch.setattr("mergelab.demo.world.build_world", no_world)
    with pytest.raises(MergelabError, match=message) as raised:
        demo_grid_settings(methods)
    assert "choose from: averaging, task_arithmetic, ties, dare_ties" in str(raised.value)
    result = CliRunner().invoke(main, ["grid", "--demo", "--out", str(tmp_path / "g"), "--methods", methods])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: --methods") and lines[-1].strip().startswith("choose from: averaging")
    assert not (tmp_path / "g").exists()


def test_counts_and_seeds_are_parsed_and_checked():
    with pytest.raises(MergelabError, match="--methods names tsv more than once"):
        demo_grid_settings("tsv,iso_c,tsv")
    assert demo_grid_settings(None, "2,4,8", "0,1,2") == {"n_experts": [2, 4, 8], "seeds": [0, 1, 2]}
    assert demo_grid_settings("tsv, iso_c", None, None) == {"methods": ["tsv", "iso_c"]}
    for bad in ("0", "2,9", "2,2", "two", ""):
        with pytest.raises(MergelabError, match="--n-experts takes"):
            demo_grid_settings(None, bad, None)
    with pytest.raises(MergelabError, match="--seeds takes"):
        demo_grid_settings(None, None, "-1")
    with pytest.raises(MergelabError, match="lm_cocktail merges 2 or more experts, but --n-experts asks for 1"):
        demo_grid_settings("lm_cocktail", "1,2", None)


def test_the_readmes_demo_grid_command_is_one_the_grid_accepts():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    command = re.search(r"^mergelab grid --demo --out \S+ (--methods .*?)\s+#", readme, flags=re.MULTILINE)
    options = dict(zip(*[iter(command.group(1).split())] * 2))
    settings = demo_grid_settings(options["--methods"], options["--n-experts"], options["--seeds"])
    assert set(MODERN) <= set(settings["methods"]) and settings["n_experts"] == [2, 4, 8]


def test_the_demo_options_need_demo(tmp_path, monkeypatch):
    monkeypatch.setattr("mergelab.demo.world.build_world", no_world)
    spec = tmp_path / "grid.yml"
    spec.write_text("base: b\n")
    for option in (["--methods", "tsv"], ["--n-experts", "2"], ["--seeds", "0"]):
        result = CliRunner().invoke(main, ["grid", str(spec), "--out", str(tmp_path / "g"), *option])
        assert result.exit_code == 2
        assert result.stderr.startswith("error: --methods, --n-experts and --seeds choose the --demo grid")
    result = CliRunner().invoke(main, ["grid", "--demo", "--out", str(tmp_path / "g"), "--n-experts", "2,2"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --n-experts takes distinct whole numbers")


# -- the "modern methods" table and verdicts ---------------------------------------------------------
def synthetic_result() -> dict:
    """Three seeds at n = 2 and 8: iso_c clearly beats every seed method held-in at both n; held-out
    tsv and ties are within their spread at n = 2, and ties clearly wins at n = 8."""
    values = {
        "averaging": {"2": {"held_in": [0.50, 0.52, 0.54], "held_out": [0.90, 0.91, 0.92]},
                      "8": {"held_in": [0.40, 0.41, 0.42], "held_out": [0.95, 0.95, 0.95]}},
        "ties": {"2": {"held_in": [0.60, 0.61, 0.62], "held_out": [0.93, 0.95, 0.97]},
                 "8": {"held_in": [0.50, 0.50, 0.50], "held_out": [1.00, 1.01, 1.02]}},
        "tsv": {"2": {"held_in": [0.70, 0.71, 0.72], "held_out": [0.94, 0.96, 0.98]},
                "8": {"held_in": [0.55, 0.56, 0.57], "held_out": [0.80, 0.81, 0.82]}},
        "iso_c": {"2": {"held_in": [0.80, 0.82, 0.84], "held_out": [0.70, 0.70, 0.70]},
                  "8": {"held_in": [0.70, 0.71, 0.72], "held_out": [0.60, 0.61, 0.62]}},
    }
    return {"methods": ["averaging", "ties", "tsv", "iso_c"], "seed_four": ["averaging", "ties"],
            "modern": ["tsv", "iso_c"], "missing": ["regmean"], "n_experts": [2, 8], "seeds": [0, 1, 2],
            "values": values, "multitask": None}


def test_the_table_has_mean_and_spread_over_seeds_per_method_and_n():
    table = modern_table(synthetic_result()).splitlines()
    assert table[0] == "| method | n=2 held-in | n=2 held-out | n=8 held-in | n=8 held-out |"
    # ties at n=2 held-out: mean 0.95, sample standard deviation 0.02
    assert table[3] == "| ties (seed paper) | 0.61 ± 0.01 | 0.95 ± 0.02 | 0.50 ± 0.00 | 1.01 ± 0.01 |"
    assert table[5] == "| iso_c | 0.82 ± 0.02 | 0.70 ± 0.00 | 0.71 ± 0.01 | 0.61 ± 0.01 |"


def test_verdicts_compare_the_best_modern_method_with_the_best_of_the_seed_four():
    held_in, held_out = modern_verdicts(synthetic_result())
    # held-in: iso_c (0.82, 0.71) vs ties (0.61, 0.50): gaps far beyond the spread at both n
    assert "n=2: iso_c 0.82 ± 0.02 vs ties 0.61 ± 0.01, reproduced" in held_in
    assert held_in.endswith("**reproduced**.")
    # held-out: at n=2 tsv 0.96 vs ties 0.95 is within the spread; at n=8 ties 1.01 beats tsv 0.81
    assert compare([0.94, 0.96, 0.98], [0.93, 0.95, 0.97]) == "inconclusive"
    assert "n=2: tsv 0.96 ± 0.02 vs ties 0.95 ± 0.02, inconclusive" in held_out
    assert "n=8: tsv 0.81 ± 0.01 vs ties 1.01 ± 0.01, not reproduced" in held_out
    assert held_out.endswith("**inconclusive**.")


def test_the_section_names_what_ran_and_what_did_not_and_points_at_full_without_it():
    lines, verdicts = modern_section(synthetic_result())
    assert "averaging, ties, tsv, iso_c" in lines[0] and "3 seeds" in lines[0]
    assert lines[-1] == "Not in this grid (not available in this build): regmean."
    assert not any("every seed picks all" in line for line in lines)
    lines, _ = modern_section({**synthetic_result(), "experts": 8})  # n = 8 of 8 experts: every seed merges all
    assert any(line.startswith("At n = 8 every seed picks all 8 experts") for line in lines)
    assert len(verdicts) == 2
    lines, verdicts = modern_section(None)
    assert "`mergelab demo --full`" in lines[0] and verdicts == []


# -- demo --full ---------------------------------------------------------------------------------
def test_the_full_flag_reaches_run_demo(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("mergelab.demo.run_demo", lambda out, **kwargs: calls.append(kwargs))
    for arguments, full in ((["--full"], True), ([], False)):
        result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--workers", "1", *arguments])
        assert result.exit_code == 0, result.output
        assert calls.pop()["full"] is full


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    from mergelab.demo import QUICK_WORLD
    from mergelab.demo.world import WorldSettings, build_world

    return build_world(WorldSettings(**QUICK_WORLD), cache=tmp_path_factory.mktemp("cache"), log=lambda *_: None,
                       workers=1)


@pytest.mark.slow
def test_grid_demo_methods_runs_the_named_methods_on_the_demo_world(quick_world, monkeypatch, tmp_path):
    monkeypatch.setattr("mergelab.demo.world.build_world", lambda **kwargs: quick_world)
    out = tmp_path / "grid"
    result = CliRunner().invoke(main, ["grid", "--demo", "--out", str(out), "--methods", "tsv,iso_c",
                                       "--n-experts", "2", "--seeds", "0,1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as handle:
        cells = {(r["method"], r["n_experts"], r["seed"]) for r in csv.DictReader(handle) if r["seed"]}
    assert cells == {(m, "2", s) for m in ("tsv", "iso_c") for s in ("0", "1")}
    assert "| tsv | 2 |" in result.output and "| iso_c | 2 |" in result.output


@pytest.mark.slow
def test_the_extra_grid_runs_every_method_on_the_demo_world_and_reports_it(quick_world, tmp_path):
    from mergelab.demo.modern import run_modern_grid

    result = run_modern_grid(quick_world, tmp_path / "modern", workers=1, n_experts=(2,), seeds=(0, 1))
    assert result["methods"] == list(full_methods())
    for method in result["methods"]:
        for split in ("held_in", "held_out"):
            values = result["values"][method]["2"][split]
            assert len(values) == 2 and all(v >= 0 for v in values), (method, split)
    lines, verdicts = modern_section(result)
    assert all(f"| {method}" in "\n".join(lines) for method in result["methods"])
    assert len(verdicts) == 2 and all("**" in v for v in verdicts)


def test_demo_spec_gives_each_expert_its_train_split_when_the_grid_takes_one(tmp_path):
    from mergelab.demo.world import World, WorldSettings
    from mergelab.experiments.spec import ExpertSpec

    world = World(tmp_path, WorldSettings())
    spec = demo_spec(world, n_experts=(2,), seeds=(0,), methods=["tsv"])
    assert [m.name for m in spec.methods] == ["tsv"] and spec.n_experts == [2]
    if "train" in ExpertSpec.model_fields:
        assert all(Path(e.train) == world.data_file(e.task, "train") for e in spec.experts)
