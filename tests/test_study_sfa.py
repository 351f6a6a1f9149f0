"""`mergelab study sfa`: the conditions it runs, its verdict rules on synthetic seeds, the quick
study end to end (its table is computed from its own runs, its verdicts.json is what `mergelab
demo --study` reads), and the demo stream's multitask baseline trained to convergence."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mergelab.demo.report import read_studies
from mergelab.evaluate.continual import continual_summary
from mergelab.evaluate.evidence import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from mergelab.studies.sfa_lm import analyse, plan_study, regimes_available, study_verdicts

VERDICTS = {REPRODUCED, INCONCLUSIVE, NOT_REPRODUCED}


def run(label: str, method: dict, old: float, new: float) -> dict:
    return {"label": label, "method": method, **continual_summary([[0.9, 0.1], [old, new]]),
            "l2_distance": [[], [1.0]], "diverged": None, "seconds": 1.0}


def synthetic(plan, sfa_new: float, spread: float) -> dict:
    """Every stream at three seeds: sequential ends at (0.3, 0.8); every SFA setting at (0.7, sfa_new)."""
    def result(stream, shift):
        runs = [run("sequential", {"name": "sequential"}, 0.3 + shift, 0.8 + shift)]
        runs += [run(f"SFA p={p:g} β={b:g}", {"name": "sfa", "p": p, "beta": b}, 0.7 + shift, sfa_new - shift)
                 for p, b in stream.sfa]
        return {"tasks": ["add", "sub"], "initial": {"add": 0.9, "sub": 0.1}, "runs": runs}
    return {s.name: [result(s, d) for d in (-spread, 0.0, spread)] for s in plan.streams}


def test_every_axis_of_the_issue_is_varied_one_at_a_time_from_the_demos_stream():
    plan = plan_study()
    reference = plan.streams[0]
    assert (reference.steps, reference.lr, reference.regime) == (150, 0.002, "plain")  # the demo's stream
    assert {p for p, _ in reference.sfa} >= {1.0, 0.25} and {b for _, b in reference.sfa} >= {0.25, 0.5, 0.75}
    axes = {s.axis for s in plan.streams}
    assert axes >= {"p / β", "training length", "learning rate"}
    for stream in plan.streams[1:]:  # exactly one thing differs from the reference
        changed = [(stream.steps != reference.steps), (stream.lr != reference.lr), (stream.regime != "plain")]
        assert sum(changed) == 1, stream
    assert ("regime" in axes) == ("pretrained" in regimes_available())
    assert plan.regimes_skipped == ([] if "pretrained" in regimes_available() else ["pretrained"])


def test_regimes_are_checked_and_one_left_out_is_reported_not_tested():
    from mergelab import MergelabError

    with pytest.raises(MergelabError, match="regime 'pretrain' is not one the SFA study knows"):
        plan_study(regimes=("plain", "pretrain"))
    plan = plan_study(regimes=("plain",))
    assert {s.regime for s in plan.streams} == {"plain"} and plan.regimes_skipped == ["pretrained"]


def test_the_papers_behaviour_needs_both_gaps_beyond_the_seeds_spread():
    plan = plan_study(quick=True)
    # SFA forgets less by 0.4 and learns sub within 0.05 of sequential, seeds ±0.01: reproduced everywhere
    rows = analyse(plan, synthetic(plan, sfa_new=0.75, spread=0.01))
    assert {r["paper_behaviour"] for r in rows} == {REPRODUCED}
    assert len(rows) == sum(len(s.sfa) for s in plan.streams)
    assert all(len(r["sfa"]["old"]) == len(r["sequential"]["new"]) == 3 for r in rows)
    # the same means with seeds ±0.25: the learning gap (0.05) no longer clears √2·0.25 → inconclusive
    rows = analyse(plan, synthetic(plan, sfa_new=0.75, spread=0.25))
    assert {r["learns_new_task"] for r in rows} == {INCONCLUSIVE}
    assert {r["paper_behaviour"] for r in rows} == {INCONCLUSIVE}
    # SFA far behind on sub: forgets less, but not the paper's behaviour
    rows = analyse(plan, synthetic(plan, sfa_new=0.4, spread=0.01))
    assert {(r["forgets_less"], r["paper_behaviour"]) for r in rows} == {(REPRODUCED, NOT_REPRODUCED)}
    verdicts = study_verdicts({"conditions": rows, "regimes_skipped": ["pretrained"]})
    assert verdicts[0]["claim"] == "sfa-demo-setting"  # p=0.25, β=0.5 on the reference stream
    assert {v["verdict"] for v in verdicts if v["claim"] != "sfa-regime-pretrained"} == {NOT_REPRODUCED}
    assert verdicts[-1] == {"claim": "sfa-regime-pretrained", "verdict": "not tested", "line": verdicts[-1]["line"]}
    assert all(v["line"].startswith("- ") and v["line"].endswith(f"**{v['verdict']}**.") for v in verdicts)


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """One quick world for this module's end-to-end tests."""
    from mergelab.demo import QUICK_WORLD
    from mergelab.demo.world import WorldSettings, build_world

    cache = tmp_path_factory.mktemp("cache")
    build_world(WorldSettings(**QUICK_WORLD), cache=cache, log=lambda *_: None, workers=1)
    return cache


@pytest.mark.slow
def test_quick_study_writes_its_table_and_verdicts_from_its_own_runs(tmp_path, monkeypatch, quick_cache):
    from mergelab.cli import main

    monkeypatch.setenv("MERGELAB_CACHE", str(quick_cache))
    out = tmp_path / "study" / "sfa"
    result = CliRunner().invoke(main, ["study", "sfa", "--quick", "--out", str(out), "--workers", "1", "--quiet",
                                       "--regimes", "plain"])  # one quick world: the pretrained one is the scale study's
    assert result.exit_code == 0, result.output
    study = json.loads((out / "results.json").read_text())
    plan = plan_study(quick=True, regimes=("plain",))
    assert study["regimes_skipped"] == ["pretrained"]
    assert [s["name"] for s in study["streams"]] == [s.name for s in plan.streams]
    for row in study["conditions"]:
        assert {row["forgets_less"], row["learns_new_task"], row["paper_behaviour"]} <= VERDICTS
        runs = [json.loads((out / "runs" / f"{row['stream']}-seed{seed}" / "results.json").read_text())
                for seed in study["seeds"]]
        sequential = [next(r for r in seed["runs"] if r["method"]["name"] == "sequential") for seed in runs]
        assert row["sequential"]["new"] == [r["accuracy_matrix"][-1][1] for r in sequential]
        assert all(s["spec"]["steps"] == row["steps"] and s["spec"]["lr"] == row["lr"] for s in runs)
    assert len(study["seeds"]) == 3
    (studied,) = read_studies(tmp_path / "study")  # `mergelab demo --study DIR` finds DIR/sfa/verdicts.json
    assert studied["verdicts"] == json.loads((out / "verdicts.json").read_text())
    assert "| varied | condition |" in studied["table"]
    report = (out / "report.md").read_text()
    assert all(v["line"] in report for v in studied["verdicts"])
    assert studied["verdicts"][-1]["claim"] == "sfa-regime-pretrained" and studied["verdicts"][-1]["verdict"] == \
        "not tested"


def test_a_bad_out_is_refused_before_any_world_is_built(tmp_path, monkeypatch):
    from mergelab.cli import main

    taken = tmp_path / "taken"
    taken.write_text("a file")
    monkeypatch.setattr("mergelab.demo.world.build_world", lambda *a, **k: pytest.fail("built before the check"))
    result = CliRunner().invoke(main, ["study", "sfa", "--quick", "--out", str(taken), "--quiet"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "taken" in result.stderr


@pytest.mark.slow
def test_the_demo_streams_multitask_baseline_is_not_below_sequential_on_the_new_task(tmp_path, quick_cache):
    """Trained jointly on add and sub with MULTITASK_SCALE × the stream's steps, the multitask
    model is not below sequential training on the new task beyond the seeds' spread (the
    baseline converged; at 1× it was a budget problem, issue 15). Measured on the quick world at
    seeds 0 and 1: multitask 1.00 and 0.55 on sub, sequential 0.55 and 0.68."""
    from mergelab.continual import run_spec
    from mergelab.demo import MULTITASK_SCALE, QUICK_WORLD, SEEDS, sfa_lm_spec
    from mergelab.demo.report import NEW_TASK_TOLERANCE
    from mergelab.demo.world import WorldSettings, build_world
    from mergelab.evaluate.evidence import compare

    world = build_world(WorldSettings(**QUICK_WORLD), cache=quick_cache, log=lambda *_: None, workers=1)
    new_task = {"sequential": [], "multitask": []}
    for seed in SEEDS:
        spec = sfa_lm_spec(world, tmp_path / "inputs", seed=seed)  # the demo's 150 steps per task
        spec["methods"] = ["sequential", {"method": "multitask", "scale": MULTITASK_SCALE}]
        run_spec(spec, tmp_path / f"seed{seed}", quiet=True)
        for run in json.loads((tmp_path / f"seed{seed}" / "results.json").read_text())["runs"]:
            new_task[run["method"]["name"]].append(run["accuracy_matrix"][-1][1])
    assert compare(new_task["multitask"], new_task["sequential"], NEW_TASK_TOLERANCE) != NOT_REPRODUCED, new_task
