"""The demo report: tables, plots and a one-line verdict with numbers for each paper claim,
all computed from the results of this run."""

from __future__ import annotations

from statistics import mean
from typing import Sequence

from mergelab.demo.tasks import WORLD_TASKS
from mergelab.evaluate.evidence import (INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTED, REPRODUCED, Summary, combine,
                                        compare, summarize)

TOLERANCE = 0.05  # ε of the LM-Cocktail paper's conditions C1/C2, in accuracy points
NEW_TASK_TOLERANCE = 0.1  # SFA "learns the new task about as well as sequential": within this of it
EVIDENCE = ("Verdicts weigh the seeds' spread (mergelab.evaluate.evidence): **reproduced** only when the gap "
            "exceeds it, **not reproduced** when the gap is reversed by more than it, **inconclusive** otherwise; "
            "**partly** when some parts (targets, methods, settings) reproduce and others do not.")


def both(*verdicts: str) -> str:
    """One verdict for a claim that needs every condition: reproduced when all are, not
    reproduced when any is not, inconclusive otherwise."""
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def show(values: Sequence[float] | float) -> str:
    """``0.71 ± 0.02`` over seeds (a single run: just the value)."""
    if isinstance(values, (int, float)):
        return f"{values:.2f}"
    summary = summarize(values)
    return f"{summary.mean:.2f}" if summary.n == 1 else str(summary)


def tally(verdicts: list[str]) -> str:
    return f"{sum(v == REPRODUCED for v in verdicts)}/{len(verdicts)} reproduced"


def score_table(scores: dict[str, dict[str, float]]) -> str:
    names = [t.name for t in WORLD_TASKS]
    held_in = [t.name for t in WORLD_TASKS if t.split == "held_in"]
    lines = ["| model | " + " | ".join(names) + " | held-in mean | held-out mean |",
             "|---|" + "---|" * (len(names) + 2)]
    for model, row in scores.items():
        cells = " | ".join(f"{row[n]:.2f}" for n in names)
        inside = mean(row[n] for n in held_in)
        outside = mean(row[n] for n in names if n not in held_in)
        lines.append(f"| {model} | {cells} | {inside:.3f} | {outside:.3f} |")
    return "\n".join(lines)


def every_method_section(study: dict) -> list[str]:
    experts = study["experts"]
    held_out = [t.name for t in WORLD_TASKS if t.split == "held_out"]
    lines = [f"Base + experts {', '.join(experts)} merged with every method (test scores; 1.00 = all right).", "",
             "| model | " + " | ".join(experts) + " | their mean | held-out mean |", "|---|" + "---|" * (len(experts) + 2)]
    for model, row in study["scores"].items():
        lines.append(f"| {model} | " + " | ".join(f"{row[t]:.2f}" for t in experts)
                     + f" | {mean(row[t] for t in experts):.3f} | {mean(row[t] for t in held_out):.3f} |")
    return lines


def cocktail_section(study: dict) -> tuple[list[str], list[str]]:
    lines = ["| target | base (target / others) | expert | LM-Cocktail (5 ex.) | mono-specialist α=0.5 |",
             "|---|---|---|---|---|"]
    for target, entry in study["targets"].items():
        cells = [f"{entry[k]['target']:.2f} / {entry[k]['others']:.2f}" for k in ("base", "expert", "cocktail", "mono")]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += ["", "Few-shot study (weights from 5 / 50 / 100 validation examples; target / others):", "",
              "| target | " + " | ".join(f"{n} examples" for n in study["targets"][next(iter(study["targets"]))]
                                        ["few_shot"]) + " |", "|---|---|---|---|"]
    for target, entry in study["targets"].items():
        lines.append(f"| {target} | " + " | ".join(f"{v['target']:.2f} / {v['others']:.2f}"
                                                  for v in entry["few_shot"].values()) + " |")
    sweep = study["sweep"]
    lines += ["", f"α sweep on '{sweep['target']}' (mono-specialist α·expert + (1−α)·base):", "",
              "| α | " + " | ".join(f"{r['alpha']:g}" for r in sweep["rows"]) + " |",
              "|---|" + "---|" * len(sweep["rows"]),
              "| target | " + " | ".join(f"{r['target']:.2f}" for r in sweep["rows"]) + " |",
              "| others | " + " | ".join(f"{r['others']:.2f}" for r in sweep["rows"]) + " |",
              "", "![alpha sweep](cocktail/sweep/sweep.png)"]
    return lines, cocktail_verdicts(study)


def cocktail_verdicts(study: dict) -> list[str]:
    """LM-Cocktail's claims; the cocktail's row is a mean over the few-shot picks' seeds, the
    expert, base and mono-specialist are single models of the world (no spread of their own)."""
    targets = study["targets"]

    def picks(entry: dict, field: str) -> list[float]:
        return entry["cocktail"].get("seeds", {}).get(field, [entry["cocktail"][field]])

    forgot = [compare([e["base"]["others"]], e["expert"]["others"]) for e in targets.values()]
    kept = [compare(picks(e, "target"), e["expert"]["target"], TOLERANCE) for e in targets.values()]
    general = [compare(picks(e, "others"), e["expert"]["others"]) for e in targets.values()]
    mono = [both(compare([e["mono"]["others"]], e["expert"]["others"]),
                 compare([e["mono"]["target"]], e["base"]["target"])) for e in targets.values()]
    five = [compare(picks(e, "target"), max(v["target"] for k, v in e["few_shot"].items() if k != "5"), TOLERANCE)
            for e in targets.values()]
    at = {r["alpha"]: r for r in study["sweep"]["rows"]}
    sweep = both(compare([at[0.5]["others"]], at[1.0]["others"]),
                 compare([at[0.5]["target"]], at[1.0]["target"], TOLERANCE))
    seeds = len(picks(next(iter(targets.values())), "target"))

    def numbers(key_a, key_b, field):
        return ", ".join(f"{t}: {show(e[key_a][field])}→"
                         + (show(picks(e, field)) if key_b == "cocktail" else show(e[key_b][field]))
                         for t, e in targets.items())

    return [
        f"- Fine-tuning makes a model forget other tasks (others, base→expert: {numbers('base', 'expert', 'others')}): "
        f"**{combine(forgot)}** ({tally(forgot)}; one world build, so no spread).",
        f"- LM-Cocktail keeps the target within ε={TOLERANCE} of the expert (target, expert→cocktail over {seeds} "
        f"picks of the 5 examples: {numbers('expert', 'cocktail', 'target')}): **{combine(kept)}** ({tally(kept)}).",
        f"- ... while recovering the other tasks (others, expert→cocktail: {numbers('expert', 'cocktail', 'others')}): "
        f"**{combine(general)}** ({tally(general)}).",
        f"- Mono-specialist (α=0.5 with the base) also recovers general ability and keeps a gain on the target "
        f"(others, expert→mono: {numbers('expert', 'mono', 'others')}): **{combine(mono)}** ({tally(mono)}; "
        f"no examples, so one run).",
        f"- Five examples are enough for the weights (5-example target within ε of the best of 50/100): "
        f"**{combine(five)}** ({tally(five)}).",
        f"- Lowering α from 1 to 0.5 raises the other tasks without losing the target (Figure 1; target "
        f"{at[1.0]['target']:.2f}→{at[0.5]['target']:.2f}, others {at[1.0]['others']:.2f}→{at[0.5]['others']:.2f}; "
        f"one run): **{sweep}**.",
    ]


def grid_section(summary: dict, table: str) -> tuple[list[str], list[str]]:
    """The grid's claims, weighed over the seeds of expert picks (``summary["per_seed"]``:
    ``{method: {n: {split: [one value per seed]}}}``)."""
    per_seed = summary["per_seed"]
    lines = [table, "", "![grid](grid/grid.png)"]
    ns = sorted({int(n) for by_n in per_seed.values() for n in by_n})
    low, high = str(ns[0]), str(ns[-1])
    methods = list(per_seed)

    def values(method, n, split) -> list[float]:
        return per_seed[method][n][split]

    grows = [compare(values(m, high, "held_out"), values(m, low, "held_out")) for m in methods]
    below = [compare([1.0], values(m, high, "held_in")) for m in methods]
    by_seed = list(zip(*(values(m, high, "held_in") for m in methods)))  # per seed: every method's held-in
    spreads = [max(seed) - min(seed) for seed in by_seed]
    alike = compare([0.10], spreads)
    seeds = len(by_seed)
    verdicts = [
        f"- More experts → better held-out generalization (held-out, n={low}→{high}, {seeds} seeds of expert picks: "
        + ", ".join(f"{m} {show(values(m, low, 'held_out'))}→{show(values(m, high, 'held_out'))}" for m in methods)
        + f"): **{combine(grows)}** ({tally(grows)} methods).",
        f"- Merged models stay below their experts on held-in tasks (normalized held-in at n={high}: "
        + ", ".join(f"{m} {show(values(m, high, 'held_in'))}" for m in methods) + f"): **{combine(below)}** "
        f"({tally(below)}).",
        f"- Methods perform alike as experts grow (spread of held-in across methods at n={high}, per seed: "
        f"{show(spreads)}; 'alike' if ≤ 0.10): **{alike}**.",
    ]
    multitask = (summary.get("multitask") or {}).get("held_out")
    if multitask is not None:
        best = max(methods, key=lambda m: Summary(tuple(values(m, high, "held_out"))).mean)
        verdicts.append(
            f"- Merging can match multitask training on held-out tasks (best merged held-out, {best} at n={high}: "
            f"{show(values(best, high, 'held_out'))} vs multitask {multitask:.2f}, within ε={TOLERANCE}): "
            f"**{compare(values(best, high, 'held_out'), multitask, TOLERANCE)}**.")
    verdicts.append(f"- Larger and instruction-tuned base models merge better: **{NOT_TESTED}** in the demo (one tiny "
                    f"size, one base); `mergelab study scale` tests it along both axes (see \"Scale and regime\").")
    return lines, verdicts


def sfa_lm_summary(per_seed: list[dict]) -> dict[str, dict]:
    """Per run label, over the seeds' streams: the method, its parameters, and the values per
    seed of the old task's and the new task's final scores and of the average accuracy."""
    runs: dict[str, dict] = {}
    for result in per_seed:
        for run in result["runs"]:
            entry = runs.setdefault(run["label"], {"method": run["method"], "old": [], "new": [], "average": []})
            final = run["accuracy_matrix"][-1]
            entry["old"].append(final[0])
            entry["new"].append(final[-1])
            entry["average"].append(run["average_accuracy"])
    return runs


def sfa_stream_verdicts(runs: dict[str, dict], tasks: list[str]) -> list[str]:
    """SFA's claims on a stream from ``sfa_lm_summary``'s values (also the SFA study's)."""
    kind = {label: entry["method"]["name"] for label, entry in runs.items()}
    sequential = next((runs[label] for label in runs if kind[label] == "sequential"), None)
    sfa = [label for label in runs if kind[label] == "sfa"]
    verdicts = []
    if sequential and sfa:
        kept = [compare(runs[label]["old"], sequential["old"]) for label in sfa]
        learnt = [compare(runs[label]["new"], sequential["new"], NEW_TASK_TOLERANCE) for label in sfa]
        verdicts.append(
            f"- SFA forgets less than sequential fine-tuning (old task '{tasks[0]}' at the end: sequential "
            f"{show(sequential['old'])}, " + ", ".join(f"{label} {show(runs[label]['old'])}" for label in sfa)
            + f"): **{combine(kept)}** ({tally(kept)} settings).")
        verdicts.append(
            f"- ... while still learning the new task '{tasks[-1]}' (within {NEW_TASK_TOLERANCE} of sequential's "
            f"{show(sequential['new'])}: " + ", ".join(f"{label} {show(runs[label]['new'])}" for label in sfa)
            + f"): **{combine(learnt)}** ({tally(learnt)} settings).")
        by_p = sorted(sfa, key=lambda label: runs[label]["method"]["p"], reverse=True)
        if runs[by_p[0]]["method"]["p"] != runs[by_p[-1]]["method"]["p"]:
            verdicts.append(
                "- Averaging more often (smaller p) keeps more of the old task (old-task score by p: "
                + ", ".join(f"p={runs[label]['method']['p']:g}: {show(runs[label]['old'])}" for label in by_p)
                + f"; p={runs[by_p[-1]]['method']['p']:g} against p={runs[by_p[0]]['method']['p']:g}): "
                f"**{compare(runs[by_p[-1]]['old'], runs[by_p[0]]['old'])}**.")
    penalties = [label for label in runs if kind[label] in ("l2", "ewc")]
    if sfa and penalties:
        best = max(sfa, key=lambda label: Summary(tuple(runs[label]["average"])).mean)
        parts = [compare(runs[best]["average"], runs[label]["average"], 0.005) for label in penalties]
        verdicts.append(f"- SFA matches or beats the L2/EWC penalties (average accuracy: best SFA, {best}, "
                        f"{show(runs[best]['average'])}; " + ", ".join(f"{label} {show(runs[label]['average'])}"
                                                                      for label in penalties)
                        + f"): **{combine(parts)}**.")
    return verdicts


def sfa_lm_section(result: dict) -> tuple[list[str], list[str]]:
    from mergelab.continual.report import stream_table

    per_seed = result["seeds"]
    tasks = per_seed[0]["tasks"]
    runs = sfa_lm_summary(per_seed)
    kind = {label: entry["method"]["name"] for label, entry in runs.items()}
    lines = [f"Stream: {' → '.join(tasks)} on the demo world's base model; scores are test accuracy "
             f"(rank classification), mean ± spread over {len(per_seed)} training seeds (a row without a "
             f"spread ran on seed 0 only):", "",
             f"| method | {tasks[0]} (old) at the end | {tasks[-1]} (new) at the end | average accuracy |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {show(e['old'])} | {show(e['new'])} | {show(e['average'])} |" for label, e in runs.items()]
    sequential = next((e for label, e in runs.items() if kind[label] == "sequential"), None)
    multitask = next(((label, e) for label, e in runs.items() if kind[label] == "multitask"), None)
    if sequential and multitask:
        label, entry = multitask
        lines += ["", f"Baseline check (not a paper claim): multitask training learns the new task '{tasks[-1]}' "
                      f"about as well as sequential training (within {NEW_TASK_TOLERANCE}; {label} "
                      f"{show(entry['new'])}, sequential {show(sequential['new'])}): "
                      f"**{compare(entry['new'], sequential['new'], NEW_TASK_TOLERANCE)}**."]
    lines += ["", "Seed 0 in full:", "", stream_table(per_seed[0]), "![task plane](sfa-lm/task_plane.png)"]
    return lines, sfa_stream_verdicts(runs, tasks)


def _digits_per_seed(data: dict, label: str) -> list[float]:
    per_seed = data.get("per_seed") or [data]
    return [next(run["average_accuracy"] for run in seed["runs"] if run["label"] == label) for seed in per_seed]


def sfa_digits_section(result: dict) -> tuple[list[str], list[str]]:
    from mergelab.studies.digits import digits_verdict
    from mergelab.continual.report import stream_table

    lines, verdicts = [], []
    for scenario, data in result["scenarios"].items():
        lines += [f"**{scenario}-incremental**", "", stream_table(data),
                  f"![split digits {scenario}](sfa-digits/split_digits_{scenario}.png)", ""]
        comparison = data["comparison"]
        best = comparison.get("best", {})
        verdict = NOT_TESTED
        if "sfa" in best and any(k in best for k in ("l2", "ewc")):
            sfa = _digits_per_seed(data, best["sfa"]["label"])
            verdict = combine([compare(sfa, _digits_per_seed(data, best[k]["label"]), 0.005)
                               for k in ("l2", "ewc") if k in best])
        verdicts.append(f"- Split digits, {scenario}-incremental — SFA matches or beats L2/EWC (the paper's "
                        f"Figure 1; best settings, over {len(data.get('per_seed') or [data])} seeds): **{verdict}**. "
                        f"{digits_verdict(comparison)}.")
    return lines, verdicts


def write_demo_report(results: dict, out) -> None:
    """``OUT/report.md`` from the demo's results."""
    from pathlib import Path

    from mergelab.demo.modern import modern_section
    from mergelab.experiments.report import markdown_table as grid_table

    out = Path(out)
    seconds = results["seconds"]
    world = results["world"]
    sections = [
        "# mergelab demo report", "",
        f"Every number below was measured by this run ({seconds['total']:.0f} s in all; world "
        f"{'built' if seconds['world'] > 5 else 'reused from the cache'}: {world['root']}). Machine timings: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
        + f" (on {results.get('workers', 1)} worker processes; both SFA parts ran beside the others).", "",
        "## The demo world", "",
        "Twelve generated tasks (8 held-in with one expert each, 4 held-out that only the base was trained on). "
        "Test scores of the base, every expert and the multitask model — fine-tuning's forgetting is visible "
        "in the held-out columns:", "", score_table(world["scores"]), "",
        "## 0. Every merge method", "", *every_method_section(results["methods"]), "",
        "One merge per method (its seeded methods at seed 0), one evaluation: a side-by-side view, and no verdict "
        "rests on it.", "",
    ]
    cocktail_lines, cocktail_claims = cocktail_section(results["cocktail"])
    grid_lines, grid_claims = grid_section(results["grid"], grid_table(results["grid"]))
    sfa_lines, sfa_claims = sfa_lm_section(results["sfa_lm"])
    digit_lines, digit_claims = sfa_digits_section(results["sfa_digits"])
    study_lines, study_claims = study_section(results.get("studies") or [])
    modern_lines, modern_claims = modern_section(results.get("modern"))
    grid_seeds = len(next(iter(next(iter(results["grid"]["per_seed"].values())).values()))["held_in"])
    sections += ["## 1. LM-Cocktail (Xiao et al.): resilient tuning by merging", "",
                 "Scores are test accuracy on the target task / mean over the eleven other tasks.", "",
                 *cocktail_lines, "", *cocktail_claims, "",
                 "## 2. Merging at scale (Yadav et al.): the grid", "",
                 "Normalized performance: held-in ÷ the task's expert, held-out ÷ the base; mean within category, "
                 f"across categories, then over {grid_seeds} seeds of expert picks (± std over seeds).", "",
                 *grid_lines, "", *grid_claims, "",
                 "### Modern methods", "", *modern_lines, "", *modern_claims, *([""] if modern_claims else []),
                 "## 3. Soup to go (SFA)", "", "### On the demo LM", "", *sfa_lines, "", *sfa_claims, "",
                 "### On split digits", "", *digit_lines, *digit_claims, "",
                 "## 4. Scale and regime", "", *study_lines, "",
                 "## Verdicts, all claims", "", EVIDENCE, "", *cocktail_claims, *grid_claims, *modern_claims,
                 *sfa_claims,
                 *digit_claims, *study_claims, "",
                 "## Reproduce", "",
                 "```bash",
                 "mergelab demo --out mergelab-demo            # everything above",
                 "mergelab grid --demo --out grid-demo         # part 2 alone",
                 "mergelab demo --out mergelab-demo --full     # with part 2's modern methods",
                 "mergelab grid --demo --out grid-modern --methods averaging,ties,tsv,iso_c --n-experts 2,4,8 "
                 "--seeds 0,1,2",
                 "mergelab sfa --digits --out sfa-digits       # split digits alone",
                 f"mergelab sfa {out / 'sfa-inputs' / 'spec-seed0.yml'} --out sfa-lm   # part 3 on the LM, seed 0",
                 "mergelab study scale --out study && mergelab study sfa --out study/sfa   # part 4",
                 "mergelab demo --out mergelab-demo --study study   # the report with part 4's verdicts",
                 "mergelab cocktail sweep sweep --finetuned <world>/models/expert-add --base <world>/models/base "
                 "--tasks <world>/tasks-test.yml --target add",
                 "```", ""]
    (out / "report.md").write_text("\n".join(sections))


# -- the studies' results ("scale and regime") ---------------------------------------------------
STUDY_FILES = ("verdicts.json", "sfa/verdicts.json")  # mergelab study scale --out DIR; study sfa --out DIR/sfa


def read_studies(directories) -> list[dict]:
    """The verdicts of ``mergelab study scale`` / ``mergelab study sfa`` output directories
    (``DIR/verdicts.json``, and ``DIR/sfa/verdicts.json`` when the SFA study was written inside
    DIR): ``[{"source": path, "verdicts": [{"claim", "verdict", "line"}], "table": the SFA
    study's conditions table or None}]``. A directory without any, or a malformed file, is a
    MergelabError (before any work)."""
    import json
    from pathlib import Path

    from mergelab.errors import MergelabError

    if directories is None:
        return []
    directories = [directories] if isinstance(directories, (str, Path)) else list(directories)
    studies = []
    for directory in map(Path, directories):
        found = [directory / name for name in STUDY_FILES if (directory / name).is_file()]
        if not found:
            raise MergelabError(f"--study {directory}: no verdicts.json there; give the --out directory of "
                                f"'mergelab study scale' or 'mergelab study sfa'")
        for path in found:
            try:
                verdicts = json.loads(path.read_text())
                if not isinstance(verdicts, list) or not all(
                        isinstance(v, dict) and {"claim", "verdict", "line"} <= set(v) for v in verdicts):
                    raise ValueError("not a list of {claim, verdict, line}")
            except ValueError as exc:
                raise MergelabError(f"--study: {path} is not a study's verdicts file ({exc}); rerun the study "
                                    f"into a fresh directory") from None
            table = path.parent / "conditions.md"  # the SFA study's table (the scale study's are too long)
            studies.append({"source": str(path.parent), "verdicts": verdicts,
                            "table": table.read_text() if table.is_file() else None})
    return studies


def study_section(studies: list[dict]) -> tuple[list[str], list[str]]:
    """Part 4: the studies' verdict lines (and the SFA study's table), or where to get them."""
    if not studies:
        return (["The papers tie several claims to model size, an instruction-tuned base and a pretrained regime, "
                 "which this one tiny world does not vary. Two studies vary them (each claim over 3 seeds, with "
                 "the same evidence rules):", "",
                 "- `mergelab study scale --out study`: sizes × base kinds × methods × number of experts (the "
                 "merging-at-scale claims and LM-Cocktail along size and regime);",
                 "- `mergelab study sfa --out study/sfa`: why SFA learns the new task less than sequential "
                 "training (training length, β, p, learning rate, regime).", "",
                 "Then `mergelab demo --study study` shows their verdicts here."], [])
    lines, claims = [], []
    for study in studies:
        lines += [f"From `{study['source']}`:", ""]
        if study["table"]:
            lines += [study["table"].rstrip("\n"), ""]
        for verdict in study["verdicts"]:
            line = verdict["line"].strip()
            line = line if line.startswith("- ") else f"- {line}"
            line = line if f"**{verdict['verdict']}**" in line else f"{line} **{verdict['verdict']}**."
            lines.append(line)
            claims.append(line)
        lines.append("")
    return lines, claims

