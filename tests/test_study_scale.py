"""The scale and regime study (issue 15): world families, verdicts computed from the results, the
quick study end to end (locally and on a local Ray instance), and the CLI's refusals."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from click.testing import CliRunner

from mergelab.cli import main
from mergelab.demo.tasks import INSTRUCTION_TASKS, VOCABULARY, WORLD_TASKS
from mergelab.demo.world import SIZES, WorldSettings
from mergelab.errors import MergelabError
from mergelab.evaluate.evidence import INCONCLUSIVE, PARTLY, REPRODUCED
from mergelab.studies.scale import QUICK, cocktail_claims, run_scale_study, scale_claims


# -- world families --------------------------------------------------------------------------------

def test_the_default_world_keeps_its_cache_key():
    # the key the demo world had before sizes and base kinds existed (existing caches stay valid)
    assert WorldSettings().key() == "ca515790eb40"
    assert WorldSettings(size="medium").key() == "ca515790eb40"
    assert WorldSettings(base_kind="plain").key() == "ca515790eb40"


def test_each_family_has_its_own_key_and_a_readable_name():
    keys = {WorldSettings(size=s, base_kind=k).key() for s in ("small", "medium", "large")
            for k in ("plain", "instruction", "pretrained")}
    assert len(keys) == 9
    large = WorldSettings(size="large", base_kind="instruction")
    assert (large.hidden, large.layers, large.heads, large.intermediate) == (256, 6, 8, 512)
    assert large.name == "large instruction"


def test_sizes_span_more_than_twenty_times_the_parameters():
    def parameters(size):  # a Llama layer: 4 h² attention + 3 h·i MLP; tied embeddings
        spec = SIZES[size]
        return spec["layers"] * (4 * spec["hidden"] ** 2 + 3 * spec["hidden"] * spec["intermediate"]) \
            + len(VOCABULARY) * spec["hidden"]

    assert parameters("large") / parameters("small") > 20


def test_family_settings_are_checked():
    with pytest.raises(MergelabError, match="base_kind 'flan' is not known"):
        WorldSettings(base_kind="flan")
    with pytest.raises(MergelabError, match="size 'huge' is not known"):
        WorldSettings(size="huge")
    with pytest.raises(MergelabError, match="drop hidden=32 or the size"):
        WorldSettings(size="large", hidden=32)


def test_the_pretrained_regime_has_light_fine_tunes():
    plain, pretrained = WorldSettings(), WorldSettings(base_kind="pretrained")
    steps, lr, multitask_steps = pretrained.expert_schedule
    assert steps < plain.expert_steps and lr < plain.expert_lr
    assert multitask_steps == 8 * steps  # what the eight experts see together
    assert plain.expert_schedule == (plain.expert_steps, plain.expert_lr, plain.multitask_steps)


def test_instruction_tasks_are_new_skills_over_the_same_vocabulary():
    world = {t.name for t in WORLD_TASKS}
    assert len(INSTRUCTION_TASKS) >= 5
    assert not world & {t.name for t in INSTRUCTION_TASKS}
    assert {t.split for t in INSTRUCTION_TASKS} == {"instruction"}
    world_words = {t.make(random.Random(0))["input"].split()[0] for t in WORLD_TASKS}
    rng = random.Random(1)
    for task in INSTRUCTION_TASKS:
        for _ in range(50):
            example = task.make(rng)
            assert example["input"].split()[0] not in world_words  # its own instruction word
            answers = example.get("options", [example.get("output")])
            assert set(example["input"].split()) | {w for a in answers for w in a.split()} <= set(VOCABULARY)


def test_an_instruction_world_writes_its_instruction_data_and_pretraining_takes_a_share(tmp_path):
    from mergelab.demo.world import World, _write_tasks, training_pairs

    settings = WorldSettings(base_kind="instruction", train_examples=50, validation_examples=5, test_examples=5)
    world = World(tmp_path, settings)
    _write_tasks(world)
    assert all(len(world.pairs(t.name, "train")) == 50 for t in INSTRUCTION_TASKS)
    listed = (tmp_path / "tasks-test.yml").read_text()
    assert not any(f"name: {t.name}\n" in listed for t in INSTRUCTION_TASKS)  # never scored as held-in/out
    pairs = training_pairs(world, ["sort", "max"], {"copy": 5, "add": 5})
    assert len(pairs) == 2 * 50 + 2 * 5
    assert pairs[-5:] == world.pairs("add", "train")[:5]


# -- verdicts from a hand-made table ---------------------------------------------------------------

NOISE = {0: -0.01, 1: 0.0, 2: 0.01}  # the same per-seed offset everywhere: spread 0.01 within a cell


def synthetic_records():
    """small/large × plain/instruction × averaging/ties × n 2/8 × 3 seeds, built so that:
    large beats small by 0.2 (held-in) and ≥ 0.15 (held-out); instruction adds 0.1 everywhere;
    held-out grows by 0.1 from n=2 to n=8 only at large; ties trails averaging by 0.2 only at small."""
    records = []
    for size in ("small", "large"):
        for kind in ("plain", "instruction"):
            for method in ("averaging", "ties"):
                for n in (2, 8):
                    for seed, noise in NOISE.items():
                        held_in = (0.6 if size == "small" else 0.8) + (0.1 if kind == "instruction" else 0)
                        held_out = (0.9 if size == "small" else 1.0 + (0.1 if n == 8 else 0)) \
                            + (0.1 if kind == "instruction" else 0)
                        if method == "ties" and size == "small":
                            held_in, held_out = held_in - 0.2, held_out - 0.2
                        records.append({"size": size, "base_kind": kind, "method": method, "n_experts": n,
                                        "seed": seed, "held_in": held_in + noise, "held_out": held_out + noise})
    return records


MULTITASK = [{"size": "large", "base_kind": "plain", "held_in": 0.9, "held_out": 1.2},
             {"size": "large", "base_kind": "instruction", "held_in": 0.9, "held_out": 1.0}]


def test_scale_verdicts_on_a_hand_made_table():
    claims = {c["claim"]: c for c in scale_claims(synthetic_records(), MULTITASK, ["small", "large"],
                                                  ["plain", "instruction"])}
    larger = claims["Merging is better with larger models"]
    # every (kind, method, split): gap ≥ 0.15 against a spread of √2·0.01
    assert larger["verdict"] == REPRODUCED and "8/8 parts reproduced" in larger["line"]
    # plain held-in, mean over methods: small (0.6 + 0.4)/2 = 0.50, large 0.80
    assert "plain held-in 0.50→0.80" in larger["line"]
    assert claims["Merging is better with instruction-tuned bases"]["verdict"] == REPRODUCED
    # held-out gain n=2→8: 0 at small, +0.10 at large (paired seeds: no spread)
    more = claims["More experts help held-out generalization, mostly at large scale"]
    assert more["verdict"] == REPRODUCED and "plain small +0.00, large +0.10" in more["line"]
    alike = claims["Methods become alike at scale"]
    assert alike["verdict"] == REPRODUCED and "plain held-in 0.20→0.00" in alike["line"]
    # large, n=8, held-out: plain 1.10 < multitask 1.20 (reversed); instruction 1.20 > 1.00
    beat = claims["Large merged models beat multitask training on held-out tasks"]
    assert beat["verdict"] == PARTLY
    assert "2/4 parts reproduced, 2 reversed" in beat["line"] and "plain best 1.10 vs 1.20" in beat["line"]
    assert len(beat["table"]) == 4 + 4  # caption, blank, header, rule, one row per (kind, method)


def test_a_gap_within_the_seeds_spread_is_inconclusive():
    records = [r for r in synthetic_records() if r["method"] == "averaging" and r["base_kind"] == "plain"]
    for r in records:  # large only 0.005 above small, seeds spread 0.01
        if r["size"] == "large":
            r["held_in"] = 0.605 + NOISE[r["seed"]]
            r["held_out"] = 0.905 + NOISE[r["seed"]]
    claims = {c["claim"]: c for c in scale_claims(records, [], ["small", "large"], ["plain"])}
    assert claims["Merging is better with larger models"]["verdict"] == INCONCLUSIVE
    assert claims["Merging is better with instruction-tuned bases"]["verdict"] == "not tested"
    assert claims["Large merged models beat multitask training on held-out tasks"]["verdict"] == "not tested"


def test_one_size_leaves_the_size_claims_untested():
    records = [r for r in synthetic_records() if r["size"] == "large"]
    claims = {c["claim"]: c["verdict"] for c in scale_claims(records, MULTITASK, ["large"], ["plain", "instruction"])}
    assert claims["Merging is better with larger models"] == "not tested"
    assert claims["Methods become alike at scale"] == "not tested"
    assert claims["Merging is better with instruction-tuned bases"] == REPRODUCED


def test_cocktail_verdicts_on_a_hand_made_table():
    world = {"size": "small", "base_kind": "plain"}
    experts = [{**world, "target": "add", "score": 1.0, "others": 0.5},
               {**world, "target": "review", "score": 0.9, "others": 0.5}]
    picks = {"add": [0.97, 0.98, 0.99], "review": [0.6, 0.7, 0.8]}  # one LM-Cocktail per seed's examples
    runs = [{**world, "target": t, "seed": s, "score": picks[t][s], "others": 0.6} for t in picks for s in range(3)]
    sweeps = [{**world, "target": "add", "rows": [{"alpha": 0.5, "target": 0.99, "others": 0.6},
                                                  {"alpha": 1.0, "target": 1.0, "others": 0.5}]},
              {**world, "target": "review", "rows": [{"alpha": 0.5, "target": 0.9, "others": 0.7},
                                                     {"alpha": 1.0, "target": 0.9, "others": 0.5}]}]
    claims = {c["claim"]: c for c in cocktail_claims(runs, experts, sweeps, ["small"], ["plain"])}
    # add: 0.98 ± 0.01 against 1.0 − ε=0.05: gap 0.03 > 0.01; review: 0.70 ± 0.10, gap −0.15 < −0.10
    kept = claims["LM-Cocktail keeps the target within ε=0.05 of the expert (small plain)"]
    assert kept["verdict"] == PARTLY and "add 1.00→0.98 ± 0.01" in kept["line"]
    assert "1/2 parts reproduced, 1 reversed" in kept["line"]
    assert claims["LM-Cocktail recovers the other tasks (small plain)"]["verdict"] == REPRODUCED
    # α 1→0.5: others +0.1 and +0.2 (0.15 ± 0.07 > 0); target −0.01 and 0 (within ε)
    sweep = claims["Lowering α from 1 to 0.5 raises the other tasks without losing the target (small plain)"]
    assert sweep["verdict"] == REPRODUCED and "others 0.15 ± 0.07" in sweep["line"]
    assert claims["LM-Cocktail keeps the target within ε, along size and regime"]["verdict"] == PARTLY
    recovered = claims["LM-Cocktail recovers the other tasks, along size and regime"]
    assert recovered["verdict"] == REPRODUCED and "reproduced in: small plain" in recovered["line"]
    runs[0]["score"] = 0.5  # add's seeds now spread 0.5..0.99: within the spread of the expert's 1.0 − ε
    claims = {c["claim"]: c for c in cocktail_claims(runs, experts, sweeps, ["small"], ["plain"])}
    assert claims["LM-Cocktail keeps the target within ε=0.05 of the expert (small plain)"]["verdict"] == INCONCLUSIVE


# -- the quick study end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    results = run_scale_study(root / "out", quick=True, workers=2, cache=root / "cache", log=lambda *_: None)
    return root, results


@pytest.mark.slow
def test_the_quick_study_writes_figures_report_and_verdicts_computed_from_its_results(quick_study):
    root, results = quick_study
    out = root / "out"
    for name in ("held-in.png", "held-out.png", "cocktail-sweeps.png", "report.md", "results.json", "verdicts.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    config = saved["config"]
    assert len(saved["worlds"]) == len(QUICK.sizes) * len(QUICK.base_kinds)
    cells = {(r["size"], r["base_kind"], r["method"], r["n_experts"], r["seed"]) for r in saved["grid"]}
    assert len(cells) == len(saved["grid"]) == 6 * len(QUICK.methods) * len(QUICK.n_experts) * len(QUICK.seeds)
    # the verdicts on disk are what the verdict code computes from the results on disk
    again = scale_claims(saved["grid"], saved["multitask"], config["sizes"], config["base_kinds"]) \
        + cocktail_claims(saved["cocktail"], saved["cocktail_experts"], saved["sweeps"], config["sizes"],
                          config["base_kinds"])
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts == [{k: c[k] for k in ("claim", "verdict", "line")} for c in again]
    assert len(verdicts) == 5 + 3 * 6 + 3
    report = (out / "report.md").read_text()
    assert all(v["line"] in report for v in verdicts)
    assert all(w["name"] in report for w in saved["worlds"])  # every configuration that was run
    assert str(root / "cache") not in report  # model names in titles, not cache paths


@pytest.mark.slow
def test_the_study_resumes_from_its_cached_runs(quick_study, tmp_path):
    root, results = quick_study
    again = run_scale_study(tmp_path / "again", quick=True, workers=1, cache=root / "cache", log=lambda *_: None)
    assert again["grid"] == results["grid"] and again["cocktail"] == results["cocktail"]


@pytest.mark.slow
def test_the_grid_fans_out_over_a_local_ray_instance(quick_study, tmp_path):
    ray = pytest.importorskip("ray")
    root, _ = quick_study
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = replace(QUICK, base_kinds=("plain",))
    try:  # other seeds than the local run's: the worlds are reused, every cell runs on Ray
        results = run_scale_study(tmp_path / "ray", config=config, seeds=[3, 4], workers=1, executor="ray",
                                  cache=root / "cache", log=lambda *_: None)
    finally:
        ray.shutdown()
    assert {r["seed"] for r in results["grid"]} == {3, 4}
    assert len(results["grid"]) == len(QUICK.sizes) * len(QUICK.methods) * len(QUICK.n_experts) * 2
    assert (tmp_path / "ray" / "verdicts.json").is_file()


# -- the CLI's refusals, before any world is built ---------------------------------------------------

@pytest.mark.parametrize("arguments, message", [
    (["--seeds", "0"], "at least two distinct seeds"),
    (["--seeds", "0,x"], "--seeds must be comma-separated whole numbers"),
    (["--address", "127.0.0.1:6379"], "--address names a Ray cluster; give it with --executor ray"),
    (["--workers", "0"], "--workers"),
])
def test_the_cli_refuses_bad_options_before_any_work(tmp_path, monkeypatch, arguments, message):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["study", "scale", "--out", str(tmp_path / "out"), "--quick", *arguments])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_the_cli_refuses_an_existing_output_without_force(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(main, ["study", "scale", "--out", str(tmp_path / "out"), "--quick"])
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    assert not (tmp_path / "cache").exists()
