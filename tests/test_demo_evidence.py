"""The demo's evidence rules: every verdict weighs the seeds' spread (gap beyond it →
reproduced; within it → inconclusive; reversed beyond it → not reproduced), the report shows
means ± spreads over 3 seeds, and the "scale and regime" section reads a study's verdicts.json.
All on synthetic results, so the rules are checked exactly; the quick demo end to end runs in
tests/test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergelab import MergelabError
from mergelab.demo.report import (cocktail_verdicts, grid_section, read_studies, sfa_stream_verdicts, study_section,
                                  write_demo_report)
from mergelab.demo.tasks import WORLD_TASKS
from mergelab.evaluate.continual import continual_summary

TASKS = [t.name for t in WORLD_TASKS]


def stream_run(label: str, method: dict, old: float, new: float) -> dict:
    """One run of an add → sub stream ending at (old, new), as the stream runner reports it."""
    return {"label": label, "method": method, **continual_summary([[0.9, 0.1], [old, new]]),
            "l2_distance": [[], [1.0]], "diverged": None, "seconds": 1.0}


def stream(seed_shift: float, sfa_old: float, sfa_new: float, sequential_new: float = 0.8) -> dict:
    shift = seed_shift
    return {"tasks": ["add", "sub"], "initial": {"add": 0.9, "sub": 0.1}, "runs": [
        stream_run("sequential", {"name": "sequential"}, 0.3 + shift, sequential_new + shift),
        stream_run("SFA p=1 β=0.5", {"name": "sfa", "p": 1.0, "beta": 0.5}, sfa_old - 0.1 + shift, sfa_new + shift),
        stream_run("SFA p=0.25 β=0.5", {"name": "sfa", "p": 0.25, "beta": 0.5}, sfa_old + shift, sfa_new + shift),
        stream_run("multitask ×3", {"name": "multitask", "scale": 3.0}, 0.9 + shift, 0.85 + shift),
        stream_run("L2 λ=0.1", {"name": "l2", "lam": 0.1}, 0.4 + shift, 0.7 + shift)]}


def verdict_of(lines: list[str], start: str) -> str:
    line = next(line for line in lines if line.startswith(start))
    return line.rsplit("**", 2)[-2]


def test_sfa_verdicts_weigh_the_gap_against_the_seeds_spread():
    from mergelab.demo.report import sfa_lm_summary

    # seeds differ by ±0.01: SFA's old-task gap (0.4) far exceeds it, its new-task deficit (0.4) too
    clear = sfa_lm_summary([stream(s, sfa_old=0.7, sfa_new=0.4) for s in (-0.01, 0.0, 0.01)])
    lines = sfa_stream_verdicts(clear, ["add", "sub"])
    assert verdict_of(lines, "- SFA forgets less") == "reproduced"
    assert verdict_of(lines, "- ... while still learning") == "not reproduced"
    assert verdict_of(lines, "- Averaging more often") == "reproduced"  # p=0.25 keeps 0.1 more than p=1
    # the same means, but seeds that spread by ±0.3: the 0.4 gap is within √(0.3² + 0.3²) = 0.42
    noisy = sfa_lm_summary([stream(s, sfa_old=0.7, sfa_new=0.4) for s in (-0.3, 0.0, 0.3)])
    lines = sfa_stream_verdicts(noisy, ["add", "sub"])
    assert verdict_of(lines, "- SFA forgets less") == "inconclusive"
    assert verdict_of(lines, "- Averaging more often") == "inconclusive"
    assert verdict_of(lines, "- ... while still learning") == "inconclusive"  # −0.4 + 0.1 within 0.42 too


def test_learning_the_new_task_within_the_tolerance_is_reproduced_only_beyond_the_spread():
    from mergelab.demo.report import sfa_lm_summary

    runs = sfa_lm_summary([stream(s, sfa_old=0.7, sfa_new=0.78) for s in (-0.01, 0.0, 0.01)])
    assert verdict_of(sfa_stream_verdicts(runs, ["add", "sub"]), "- ... while still learning") == "reproduced"
    runs = sfa_lm_summary([stream(s, sfa_old=0.7, sfa_new=0.7) for s in (-0.1, 0.0, 0.1)])  # gap 0 ± 0.14
    assert verdict_of(sfa_stream_verdicts(runs, ["add", "sub"]), "- ... while still learning") == "inconclusive"


def cocktail_study(picks: list[float]) -> dict:
    entry = {"base": {"target": 0.2, "others": 0.6}, "expert": {"target": 1.0, "others": 0.4},
             "mono": {"target": 0.8, "others": 0.55},
             "few_shot": {"5": {"target": picks[0], "others": 0.5}, "50": {"target": 0.95, "others": 0.5},
                          "100": {"target": 0.95, "others": 0.5}},
             "cocktail": {"target": sum(picks) / len(picks), "others": 0.5,
                          "seeds": {"target": picks, "others": [0.5, 0.52, 0.48]}}}
    return {"targets": {"add": entry}, "sweep": {"target": "add", "rows": [
        {"alpha": 0.0, "target": 0.2, "others": 0.6}, {"alpha": 0.5, "target": 0.9, "others": 0.55},
        {"alpha": 1.0, "target": 1.0, "others": 0.4}]}}


def test_cocktail_target_kept_only_when_the_picks_agree():
    # within ε=0.05 of the expert's 1.0 on every pick → reproduced; picks spread across the line → inconclusive
    kept = cocktail_verdicts(cocktail_study([0.99, 0.98, 1.0]))
    assert verdict_of(kept, "- LM-Cocktail keeps the target") == "reproduced"
    assert "0.99 ± 0.01" in next(line for line in kept if line.startswith("- LM-Cocktail keeps"))
    spread = cocktail_verdicts(cocktail_study([1.0, 0.8, 1.0]))  # mean 0.93, spread 0.12: gap −0.02 ± 0.12
    assert verdict_of(spread, "- LM-Cocktail keeps the target") == "inconclusive"
    lost = cocktail_verdicts(cocktail_study([0.6, 0.62, 0.58]))
    assert verdict_of(lost, "- LM-Cocktail keeps the target") == "not reproduced"
    assert verdict_of(lost, "- ... while recovering") == "reproduced"  # 0.50 ± 0.02 against 0.40
    assert verdict_of(lost, "- Fine-tuning makes a model forget") == "reproduced"


def grid_summary(high_held_out: list[float]) -> dict:
    per_seed = {m: {"2": {"held_in": [0.8, 0.82, 0.78], "held_out": [0.9, 0.91, 0.89]},
                    "4": {"held_in": [0.7, 0.72, 0.68], "held_out": high_held_out}}
                for m in ("averaging", "ties")}
    cells = {m: {n: {s: {"mean": sum(v) / 3, "std": 0.0, "seeds": 3} for s, v in by_split.items()}
                 for n, by_split in by_n.items()} for m, by_n in per_seed.items()}
    return {"cells": cells, "per_seed": per_seed, "multitask": {"held_in": 0.95, "held_out": 0.9}, "problems": []}


def test_grid_verdicts_use_the_seeds_of_expert_picks():
    _, verdicts = grid_section(grid_summary([1.0, 1.02, 0.98]), "table")
    assert verdict_of(verdicts, "- More experts") == "reproduced"  # 1.00 ± 0.02 against 0.90 ± 0.01
    assert verdict_of(verdicts, "- Merged models stay below") == "reproduced"
    _, verdicts = grid_section(grid_summary([0.7, 1.1, 0.9]), "table")  # 0.90 ± 0.20 against 0.90
    assert verdict_of(verdicts, "- More experts") == "inconclusive"
    assert any("mergelab study scale" in v for v in verdicts)  # size and base: tested by the study, not here


def synthetic_results(studies: list[dict] | None = None) -> dict:
    scores = {model: {t: 0.5 for t in TASKS} for model in ("base", "expert-add", "multitask")}
    digits_runs = [{**stream_run("SFA p=0.25 β=0.5", {"name": "sfa", "p": 0.25, "beta": 0.5}, 0.7, 0.8)},
                   {**stream_run("L2 λ=0.1", {"name": "l2", "lam": 0.1}, 0.6, 0.8)}]
    digits = {"tasks": ["A", "B"], "initial": {"A": 0.9, "B": 0.1}, "runs": digits_runs,
              "per_seed": [{"runs": [stream_run(r["label"], r["method"], 0.7 - 0.1 * (i == 1) + d, 0.8)
                                     for i, r in enumerate(digits_runs)]} for d in (-0.01, 0.0, 0.01)],
              "comparison": {"best": {"sfa": {"label": "SFA p=0.25 β=0.5", "average_accuracy": 0.75},
                                      "l2": {"label": "L2 λ=0.1", "average_accuracy": 0.7}},
                             "dominated_by_sfa": {"l2": 1, "l2_points": 1}, "sfa_default": 0.75,
                             "settings": {"sfa": 1, "l2": 1}}}
    return {
        "workers": 2, "seconds": {"world": 1.0, "methods": 2.0, "total": 10.0}, "studies": studies or [],
        "world": {"root": "/cache/world-x", "scores": scores, "build_seconds": 1.0},
        "methods": {"experts": ["add"], "scores": {"base": scores["base"], "ties": scores["base"]}},
        "cocktail": cocktail_study([0.99, 0.98, 1.0]),
        "grid": grid_summary([1.0, 1.02, 0.98]),
        "sfa_lm": {"seeds": [stream(s, sfa_old=0.7, sfa_new=0.4) for s in (-0.01, 0.0, 0.01)]},
        "sfa_digits": {"scenarios": {"class": digits}},
    }


def test_the_demo_report_shows_three_seeds_and_points_at_the_studies(tmp_path):
    write_demo_report(synthetic_results(), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "over 3 training seeds" in report and "over 3 seeds of expert picks" in report
    assert "| sequential | 0.30 ± 0.01 | 0.80 ± 0.01 |" in report  # mean ± spread of add and sub at the end
    assert "Baseline check" in report and "multitask ×3 0.85 ± 0.01, sequential 0.80 ± 0.01): **reproduced**" in report
    assert "## 4. Scale and regime" in report and "`mergelab study scale --out study`" in report
    assert "`mergelab study sfa --out study/sfa`" in report
    assert "no verdict rests on it" in report
    assert "inconclusive" in report.split("## Verdicts, all claims")[1]  # the rule is stated with the verdicts
    assert "**not reproduced**" in report  # SFA's new task: 0.40 against 0.80


def write_verdicts(directory: Path, verdicts) -> Path:
    directory.mkdir(parents=True)
    (directory / "verdicts.json").write_text(json.dumps(verdicts))
    return directory


def test_demo_study_shows_the_studies_verdicts(tmp_path):
    scale = write_verdicts(tmp_path / "study", [
        {"claim": "size", "verdict": "reproduced", "line": "- Larger models merge better (0.7 → 0.9): **reproduced**."},
        {"claim": "base", "verdict": "inconclusive", "line": "Instruction-tuned bases merge better (0.80 vs 0.82)"}])
    write_verdicts(scale / "sfa", [{"claim": "sfa-demo-setting", "verdict": "not reproduced",
                                    "line": "- SFA study: at the demo's setting: **not reproduced**."}])
    (scale / "sfa" / "conditions.md").write_text("| varied | condition |\n|---|---|\n| p / β | p=1 |\n")
    studies = read_studies(scale)
    assert [len(s["verdicts"]) for s in studies] == [2, 1]
    lines, claims = study_section(studies)
    assert claims[0] == "- Larger models merge better (0.7 → 0.9): **reproduced**."
    assert claims[1] == "- Instruction-tuned bases merge better (0.80 vs 0.82) **inconclusive**."
    assert "| p / β | p=1 |" in "\n".join(lines)
    (tmp_path / "report").mkdir()
    write_demo_report(synthetic_results(studies), tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    section = report.split("## 4. Scale and regime")[1].split("## Verdicts")[0]
    assert "Larger models merge better" in section and "mergelab study scale --out" not in section
    assert report.split("## Verdicts, all claims")[1].count("SFA study: at the demo's setting") == 1


@pytest.mark.parametrize("content, message", [
    (None, r"--study .*nothing-here: no verdicts.json there"),
    ("{not json", r"--study: .*verdicts.json is not a study's verdicts file"),
    ('[{"claim": "x"}]', r"--study: .*verdicts.json is not a study's verdicts file"),
])
def test_a_bad_study_directory_is_one_error_line_before_any_work(tmp_path, monkeypatch, content, message):
    from mergelab.cli import main
    from mergelab.demo import run_demo

    directory = tmp_path / "nothing-here"
    directory.mkdir()
    if content is not None:
        (directory / "verdicts.json").write_text(content)
    monkeypatch.setattr("mergelab.demo.world.build_world", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(MergelabError, match=message):
        run_demo(tmp_path / "out", quiet=True, study=directory)
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out"), "--study", str(directory), "--quiet"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --study")


def test_figures_name_models_not_paths_and_give_each_method_one_colour(monkeypatch, tmp_path):
    from matplotlib.colors import to_hex

    from mergelab.continual.report import model_title, plot_task_plane
    from mergelab.experiments.report import plot_grid
    from mergelab.plots import method_color, new_figure

    assert model_title("/root/.cache/mergelab/world-ca515790eb40/models/base") == "base"
    assert model_title("tiny") == "tiny"
    _, (plane,) = new_figure()
    plot_task_plane(plane, stream(0.0, sfa_old=0.7, sfa_new=0.4), "p")
    points = {c.get_label(): to_hex(c.get_facecolor()[0]) for c in plane.collections if c.get_label()[0] != "_"}
    assert points["sequential"] == method_color("sequential") and points["multitask ×3"] == method_color("multitask")
    curves = {line.get_label(): to_hex(line.get_color()) for line in plane.lines}
    assert curves["SFA β=0.5"] == method_color("sfa") and curves["L2"] == method_color("l2")

    drawn = {}
    monkeypatch.setattr("mergelab.plots.save_figure", lambda figure, path: drawn.setdefault("figure", figure))
    plot_grid(grid_summary([1.0, 1.02, 0.98]), tmp_path / "grid.png")
    held_in = drawn["figure"].axes[0]
    assert held_in.xaxis.get_major_locator()._integer  # 2 and 4 experts, never 2.5
    lines = {c.get_label(): to_hex(c.lines[0].get_color()) for c in held_in.containers}
    assert lines == {"averaging": method_color("averaging"), "ties": method_color("ties")}
    assert to_hex(held_in.lines[-2].get_color()) == method_color("multitask")  # the dashed reference


def test_the_demos_budget_cuts_keep_every_verdicts_methods_on_every_seed(tmp_path):
    """Seeds 1 and 2 of the demo's stream run every method a paper's verdict weighs (sequential,
    the three SFA settings, L2); the ×4 multitask baseline and the extra baselines run on seed 0
    alone. The demo's split-digits grid is the study's grid thinned: every setting it runs is one
    the study runs, and each family keeps its study-best setting (SFA p=.25 β=.4, L2 λ=.1, EWC λ=1e5)."""
    from mergelab.demo import DIGITS_GRID, sfa_lm_spec
    from mergelab.studies.digits import DigitsConfig

    class World:  # the spec reads only the data the stream trains and scores on
        base = tmp_path / "base"

        def pairs(self, name, split):
            return [{"input": f"{name} 1", "output": "2"}]

        def data_file(self, name, split):
            return tmp_path / f"{name}.{split}.jsonl"

    def names(spec):
        return [m if isinstance(m, str) else m["method"] for m in spec["methods"]]

    first, other = (sfa_lm_spec(World(), tmp_path / "inputs", seed=s, every_method=s == 0) for s in (0, 1))
    assert names(other) == ["sequential", "sfa", "l2"]
    assert set(names(first)) == {"sequential", "sfa", "l2", "rehearsal", "multitask", "task_arithmetic", "ties"}
    assert first["methods"][1] == other["methods"][1]  # the same SFA settings on every seed

    def settings(config):
        return {json.dumps(m.to_dict(), sort_keys=True) for m in config.methods()}

    demo, study = settings(DigitsConfig(**DIGITS_GRID)), settings(DigitsConfig())
    assert demo < study and len(demo) == 20
    labels = {m.title for m in DigitsConfig(**DIGITS_GRID).methods()}  # each family's best in the full grid
    assert {"SFA p=0.25 β=0.4", "L2 λ=0.1", "EWC λ=100000"} <= labels
