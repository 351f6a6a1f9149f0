"""`mergelab study sfa --out DIR`: why SFA learns the new task less than sequential fine-tuning
on the demo LM stream (learn add, then sub), and which conditions give the paper's behaviour.

The paper's behaviour (Soup to go, §5): SFA **forgets less** than sequential fine-tuning (the
old task's final score is higher) **and learns the new task about as well** (its final score
within ``NEW_TASK_TOLERANCE`` of sequential's). Each condition changes one thing from the
demo's stream, three training seeds each, sequential fine-tuning rerun beside it:

* p (averaging period) and β (weight on the old checkpoint), at the demo's length and rate;
* training length (steps per task) and learning rate, for SFA at p=0.25 and p=1 (β=0.5);
* the regime: the demo world's plain base, and the pretrained-regime base of ``mergelab study
  scale`` (``WorldSettings(base_kind="pretrained")``) when this version of the world has it.

Every verdict is ``mergelab.evaluate.evidence.compare`` over the seeds: the gap must exceed
the seeds' spread. Each (stream, seed) is one unit of work in the worker pool.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from mergelab.parallel import check_workers, worker_pool

SEEDS = (0, 1, 2)
DEMO = {"steps": 150, "lr": 0.002}  # the demo's stream (mergelab.demo.sfa_lm_spec)
QUICK = {"steps": 20, "lr": 0.002}


@dataclass(frozen=True)
class Stream:
    """One training setting (length, rate, regime) and the SFA settings (p, β) run on it, each
    compared with sequential fine-tuning on the same setting and seeds."""

    name: str
    axis: str  # what this stream varies: "p / β", "training length", "learning rate", "regime"
    steps: int
    lr: float
    regime: str = "plain"
    sfa: tuple[tuple[float, float], ...] = ((0.25, 0.5), (1.0, 0.5))  # (p, β)

    def methods(self) -> list:
        return ["sequential", *({"method": "sfa", "p": p, "beta": beta} for p, beta in self.sfa)]


@dataclass
class StudyPlan:
    streams: list[Stream]
    seeds: tuple[int, ...] = SEEDS
    regimes_skipped: list[str] = field(default_factory=list)


def regimes_available() -> list[str]:
    """The regimes this version of the demo world can build: always plain; pretrained when the
    world has base kinds (issue 15's world families)."""
    from mergelab.demo.world import WorldSettings

    kinds = ["plain"]
    if "base_kind" in WorldSettings.__dataclass_fields__:
        kinds.append("pretrained")
    return kinds


def plan_study(quick: bool = False, regimes: tuple[str, ...] = ("plain", "pretrained")) -> StudyPlan:
    """The streams: the demo's setting with p and β swept, then one axis changed at a time.
    ``regimes``: besides plain (always run), the regimes to compare; one this version of the
    world cannot build is reported as not tested, and one left out as not run."""
    from mergelab.errors import MergelabError

    unknown = [r for r in regimes if r not in ("plain", "pretrained")]
    if unknown:
        raise MergelabError(f"regime '{unknown[0]}' is not one the SFA study knows; use plain and/or pretrained")
    length, lr = (QUICK if quick else DEMO)["steps"], (QUICK if quick else DEMO)["lr"]
    if quick:
        reference = Stream("reference", "p / β", length, lr, sfa=((1.0, 0.5), (0.25, 0.5), (0.25, 0.25)))
        changed = [Stream("steps-x2", "training length", 2 * length, lr),
                   Stream("lr-x2", "learning rate", length, 2 * lr)]
    else:
        # sized to run in well under an hour on 2 busy cores: the directions that could let SFA learn more of
        # the new task (longer training, a faster rate, a weaker pull β) rather than both sides of each axis
        reference = Stream("reference", "p / β", length, lr, sfa=((1.0, 0.5), (0.25, 0.5), (0.25, 0.25), (0.25, 0.75)))
        changed = [Stream("steps-x2", "training length", 2 * length, lr, sfa=((0.25, 0.5),)),
                   Stream("lr-x2", "learning rate", length, lr * 2, sfa=((0.25, 0.5),))]
    skipped = []
    if "pretrained" in regimes and "pretrained" in regimes_available():
        changed.append(Stream("pretrained", "regime", length, lr, regime="pretrained", sfa=((0.25, 0.5),)))
    else:
        skipped.append("pretrained")
    return StudyPlan([reference, *changed], regimes_skipped=skipped)


def world_for(regime: str, quick: bool, cache, log, pool):
    from mergelab.demo import QUICK_WORLD
    from mergelab.demo.world import WorldSettings, build_world

    settings = WorldSettings(**QUICK_WORLD) if quick else WorldSettings()
    if regime != "plain":
        settings = replace(settings, base_kind=regime)
    return build_world(settings, cache=cache, log=log, workers=pool)


def stream_spec(template: dict, stream: Stream, seed: int) -> dict:
    return {**template, "methods": stream.methods(), "steps": stream.steps, "lr": stream.lr, "seed": seed}


def run_unit(spec: dict, out: Path) -> dict:
    """One stream at one seed (a unit of work): its results (``run_spec``'s results.json)."""
    from mergelab.continual import run_spec

    run_spec(spec, out, force=True, quiet=True)
    return json.loads((out / "results.json").read_text())


def run_sfa_study(out: str | Path, quick: bool = False, workers: int | None = None, cache: str | Path | None = None,
                  force: bool = False, quiet: bool = False,
                  regimes: tuple[str, ...] = ("plain", "pretrained")) -> dict:
    """Run every stream at every seed; write ``results.json``, ``conditions.md``, ``verdicts.json``
    (``[{"claim", "verdict", "line"}]``, the format ``mergelab demo --study`` reads) and
    ``report.md`` into ``out`` (published whole, or not at all). Returns the results.

    ``quick``: the demo's quick world and 20-step streams, a few conditions (a smoke test,
    not a result). ``regimes``: leave out "pretrained" to skip building that world (its
    verdict then reads "not tested").

    Example:
        >>> run_sfa_study("study-sfa", workers=2)  # doctest: +SKIP
    """
    from transformers.utils import logging as hf_logging

    from mergelab.demo import sfa_lm_spec
    from mergelab.outdir import atomic_directory, check_output_dir

    hf_logging.disable_progress_bar()
    workers = check_workers(workers)
    check_output_dir(out, force)
    log: Callable[[str], None] = (lambda *_: None) if quiet else print
    plan = plan_study(quick, tuple(regimes))
    started = time.perf_counter()
    with atomic_directory(out, force) as tmp, worker_pool(workers) as pool:
        templates = {}
        for regime in sorted({s.regime for s in plan.streams}):
            world = world_for(regime, quick, cache, log, pool)
            templates[regime] = sfa_lm_spec(world, tmp / "inputs" / regime)
            templates[regime].pop("methods")
        units = [(stream, seed) for stream in plan.streams for seed in plan.seeds]
        log(f"SFA study: {len(plan.streams)} streams × {len(plan.seeds)} seeds on {workers} worker(s)")
        results = pool.imap(run_unit, [(stream_spec(templates[s.regime], s, seed),
                                        tmp / "runs" / f"{s.name}-seed{seed}") for s, seed in units])
        per_stream: dict[str, list[dict]] = {}
        for (stream, seed), result in zip(units, results):
            per_stream.setdefault(stream.name, []).append(result)
            log(f"  {stream.name} seed {seed} done")
        conditions = analyse(plan, per_stream)
        study = {"quick": quick, "seeds": list(plan.seeds), "workers": workers,
                 "streams": [stream.__dict__ for stream in plan.streams], "regimes_skipped": plan.regimes_skipped,
                 "conditions": conditions, "seconds": time.perf_counter() - started}
        verdicts = study_verdicts(study)
        (tmp / "results.json").write_text(json.dumps(study, indent=2) + "\n")
        (tmp / "conditions.md").write_text(conditions_table(conditions) + "\n")
        (tmp / "verdicts.json").write_text(json.dumps(verdicts, indent=2) + "\n")
        (tmp / "report.md").write_text(study_report(study, verdicts))
    log(f"SFA study done in {study['seconds']:.0f} s; report: {Path(out) / 'report.md'}")
    return study


# -- analysis ------------------------------------------------------------------------------------
def analyse(plan: StudyPlan, per_stream: dict[str, list[dict]]) -> list[dict]:
    """One row per (stream, SFA setting): the seeds' old- and new-task scores of SFA and of
    sequential fine-tuning on the same stream, and the three verdicts."""
    from mergelab.demo.report import NEW_TASK_TOLERANCE, both, sfa_lm_summary
    from mergelab.evaluate.evidence import compare

    rows = []
    for stream in plan.streams:
        runs = sfa_lm_summary(per_stream[stream.name])
        sequential = next(e for e in runs.values() if e["method"]["name"] == "sequential")
        for label, entry in runs.items():
            if entry["method"]["name"] != "sfa":
                continue
            forgets_less = compare(entry["old"], sequential["old"])
            learns = compare(entry["new"], sequential["new"], NEW_TASK_TOLERANCE)
            rows.append({"stream": stream.name, "axis": stream.axis, "steps": stream.steps, "lr": stream.lr,
                         "regime": stream.regime, "p": entry["method"]["p"], "beta": entry["method"]["beta"],
                         "sequential": {"old": sequential["old"], "new": sequential["new"]},
                         "sfa": {"old": entry["old"], "new": entry["new"]},
                         "forgets_less": forgets_less, "learns_new_task": learns,
                         "paper_behaviour": both(forgets_less, learns)})
    return rows


def describe(row: dict) -> str:
    return (f"{row['regime']}, {row['steps']} steps, lr {row['lr']:g}, p={row['p']:g}, β={row['beta']:g}")


def conditions_table(rows: list[dict]) -> str:
    from mergelab.demo.report import show

    lines = ["| varied | condition | sequential old / new | SFA old / new | forgets less | learns the new task "
             "(within 0.1) | paper's behaviour |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        seq, sfa = row["sequential"], row["sfa"]
        lines.append(f"| {row['axis']} | {describe(row)} | {show(seq['old'])} / {show(seq['new'])} | "
                     f"{show(sfa['old'])} / {show(sfa['new'])} | {row['forgets_less']} | {row['learns_new_task']} | "
                     f"**{row['paper_behaviour']}** |")
    return "\n".join(lines)


def study_verdicts(study: dict) -> list[dict]:
    """One verdict per axis: does some condition along it give the paper's behaviour? Plus the
    demo's own setting (p=0.25, β=0.5 on the reference stream)."""
    from mergelab.evaluate.evidence import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTED, REPRODUCED

    rows = study["conditions"]
    verdicts = []
    demo = next((r for r in rows if r["stream"] == "reference" and r["p"] == 0.25 and r["beta"] == 0.5), None)
    if demo is not None:
        verdicts.append({"claim": "sfa-demo-setting", "verdict": demo["paper_behaviour"],
                         "line": f"- SFA study: at the demo's setting ({describe(demo)}) SFA forgets less "
                                 f"({demo['forgets_less']}) and learns the new task within 0.1 of sequential "
                                 f"({demo['learns_new_task']}): **{demo['paper_behaviour']}**."})
    for axis in dict.fromkeys(r["axis"] for r in rows):
        mine = [r for r in rows if r["axis"] == axis]
        found = [r for r in mine if r["paper_behaviour"] == REPRODUCED]
        verdict = REPRODUCED if found else (
            INCONCLUSIVE if any(r["paper_behaviour"] == INCONCLUSIVE for r in mine) else NOT_REPRODUCED)
        which = "; ".join(f"{describe(r)}: {r['paper_behaviour']}" for r in mine)
        slug = axis.replace(" / ", "-").replace(" ", "-").replace("β", "beta")
        verdicts.append({"claim": f"sfa-{slug}", "verdict": verdict,
                         "line": f"- SFA study, varying {axis}: some condition gives the paper's behaviour "
                                 f"({len(found)}/{len(mine)}: {which}): **{verdict}**."})
    for regime in study["regimes_skipped"]:
        verdicts.append({"claim": f"sfa-regime-{regime}", "verdict": NOT_TESTED,
                         "line": f"- SFA study, {regime} regime (not run here: left out with --regimes, or this "
                                 f"version of the demo world has no {regime} base): **{NOT_TESTED}**."})
    return verdicts


def study_report(study: dict, verdicts: list[dict]) -> str:
    from mergelab.demo.report import EVIDENCE, NEW_TASK_TOLERANCE

    streams = ", ".join(f"{s['name']} ({s['steps']} steps, lr {s['lr']:g}, {s['regime']})" for s in study["streams"])
    return "\n".join([
        "# SFA on the demo LM: when does it learn the new task?", "",
        f"Stream: learn add, then sub, from the demo world's base; {len(study['seeds'])} training seeds per "
        f"condition; {study['seconds']:.0f} s on {study['workers']} worker(s)"
        f"{' (quick: not a result)' if study['quick'] else ''}.",
        f"Streams: {streams}.", "",
        f"The paper's behaviour: SFA forgets less than sequential fine-tuning (old task 'add' higher at the end) and "
        f"learns the new task 'sub' within {NEW_TASK_TOLERANCE} of sequential. Scores: test accuracy, mean ± spread "
        f"over seeds. {EVIDENCE}", "",
        conditions_table(study["conditions"]), "", "## Verdicts", "", *(v["line"] for v in verdicts), "",
        "Each stream's runs (tables and task planes) are under `runs/<stream>-seed<k>/`.", ""])
