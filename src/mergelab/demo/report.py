"""The demo report: tables, plots and a one-line verdict with numbers for each paper claim,
all computed from the results of this run."""

from __future__ import annotations

from statistics import mean

from mergelab.demo.tasks import WORLD_TASKS

TOLERANCE = 0.05  # ε of the LM-Cocktail paper's conditions C1/C2, in accuracy points


def claim_verdict(ok: bool | None, partly: bool = False) -> str:
    if ok is None:
        return "not tested"
    return "reproduced" if ok else ("partly" if partly else "not reproduced")


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
    entries = study["targets"].values()
    forgot = [e["expert"]["others"] < e["base"]["others"] for e in entries]
    kept = [e["cocktail"]["target"] >= e["expert"]["target"] - TOLERANCE for e in entries]
    general = [e["cocktail"]["others"] > e["expert"]["others"] for e in entries]
    mono = [e["mono"]["others"] > e["expert"]["others"] and e["mono"]["target"] > e["base"]["target"] for e in entries]
    five = [e["few_shot"]["5"]["target"] >= max(v["target"] for v in e["few_shot"].values()) - TOLERANCE
            for e in entries]
    rows = study["sweep"]["rows"]
    at = {r["alpha"]: r for r in rows}
    sweep_ok = at[0.5]["others"] > at[1.0]["others"] and at[0.5]["target"] >= at[1.0]["target"] - TOLERANCE
    n = len(forgot)

    def numbers(key_a, key_b, field):
        return ", ".join(f"{t}: {e[key_a][field]:.2f}→{e[key_b][field]:.2f}" for t, e in study["targets"].items())

    return [
        f"- Fine-tuning makes a model forget other tasks (others, base→expert: {numbers('base', 'expert', 'others')}): "
        f"**{claim_verdict(all(forgot), any(forgot))}** ({sum(forgot)}/{n} targets).",
        f"- LM-Cocktail keeps the target within ε={TOLERANCE} of the expert (target, expert→cocktail: "
        f"{numbers('expert', 'cocktail', 'target')}): **{claim_verdict(all(kept), any(kept))}** ({sum(kept)}/{n}).",
        f"- ... while recovering the other tasks (others, expert→cocktail: {numbers('expert', 'cocktail', 'others')}): "
        f"**{claim_verdict(all(general), any(general))}** ({sum(general)}/{n}).",
        f"- Mono-specialist (α=0.5 with the base) also recovers general ability and keeps a gain on the target "
        f"(others, expert→mono: {numbers('expert', 'mono', 'others')}): **{claim_verdict(all(mono), any(mono))}** "
        f"({sum(mono)}/{n}).",
        f"- Five examples are enough for the weights (5-example target within ε of the best of 5/50/100): "
        f"**{claim_verdict(all(five), any(five))}** ({sum(five)}/{n}).",
        f"- Lowering α from 1 to 0.5 raises the other tasks without losing the target (Figure 1; target "
        f"{at[1.0]['target']:.2f}→{at[0.5]['target']:.2f}, others {at[1.0]['others']:.2f}→{at[0.5]['others']:.2f}): "
        f"**{claim_verdict(sweep_ok)}**.",
    ]


def grid_section(summary: dict, table: str) -> tuple[list[str], list[str]]:
    cells = summary["cells"]
    lines = [table, "", "![grid](grid/grid.png)"]
    ns = sorted({int(n) for by_n in cells.values() for n in by_n})
    low, high = str(ns[0]), str(ns[-1])

    def get(method, n, split):
        return cells[method][n][split]["mean"]

    grows = {m: get(m, high, "held_out") > get(m, low, "held_out") for m in cells}
    held_in_high = {m: get(m, high, "held_in") for m in cells}
    spread = max(held_in_high.values()) - min(held_in_high.values())
    multitask = summary.get("multitask") or {}
    best_out = max(get(m, high, "held_out") for m in cells)
    below_experts = all(v < 1 for v in held_in_high.values())
    verdicts = [
        f"- More experts → better held-out generalization (held-out, n={low}→{high}: "
        + ", ".join(f"{m} {get(m, low, 'held_out'):.2f}→{get(m, high, 'held_out'):.2f}" for m in cells)
        + f"): **{claim_verdict(all(grows.values()), any(grows.values()))}** "
          f"({sum(grows.values())}/{len(grows)} methods).",
        f"- Merged models stay below their experts on held-in tasks (normalized held-in at n={high}: "
        + ", ".join(f"{m} {v:.2f}" for m, v in held_in_high.items()) + f"): **{claim_verdict(below_experts)}**.",
        f"- Methods perform alike as experts grow (spread of held-in at n={high}: {spread:.2f}; "
        f"'alike' if ≤ 0.10): **{claim_verdict(spread <= 0.10, spread <= 0.2)}**.",
    ]
    if multitask:
        verdicts.append(
            f"- Merging can match multitask training on held-out tasks (best merged held-out {best_out:.2f} vs "
            f"multitask {multitask.get('held_out', float('nan')):.2f}): "
            f"**{claim_verdict(best_out >= multitask.get('held_out', float('inf')) - TOLERANCE)}**.")
    verdicts.append("- Larger and instruction-tuned base models merge better: **not tested** (one tiny model size "
                    "and one base here).")
    return lines, verdicts


def sfa_lm_section(result: dict) -> tuple[list[str], list[str]]:
    from mergelab.continual.report import stream_table

    tasks = result["tasks"]
    runs = {run["label"]: run for run in result["runs"]}
    final = {label: run["accuracy_matrix"][-1] for label, run in runs.items()}
    kind = {label: run["method"]["name"] for label, run in runs.items()}
    old, new = 0, len(tasks) - 1
    sequential = next((final[label] for label in final if kind[label] == "sequential"), None)
    sfa_labels = [label for label in final if kind[label] == "sfa"]
    lines = [f"Stream: {' → '.join(tasks)} on the demo world's base model; scores are test accuracy "
             f"(rank classification).", "", stream_table(result), "![task plane](sfa-lm/task_plane.png)"]
    verdicts = []
    if sequential and sfa_labels:
        kept = [label for label in sfa_labels if final[label][old] > sequential[old]]
        learnt = [label for label in sfa_labels if final[label][new] >= sequential[new] - 0.1]
        verdicts.append(
            f"- SFA forgets less than sequential fine-tuning (old task '{tasks[old]}' at the end: sequential "
            f"{sequential[old]:.2f}, " + ", ".join(f"{l} {final[l][old]:.2f}" for l in sfa_labels)
            + f"): **{claim_verdict(len(kept) == len(sfa_labels), bool(kept))}** "
              f"({len(kept)}/{len(sfa_labels)} settings).")
        verdicts.append(
            f"- ... while still learning the new task '{tasks[new]}' (within 0.1 of sequential's "
            f"{sequential[new]:.2f}: " + ", ".join(f"{l} {final[l][new]:.2f}" for l in sfa_labels)
            + f"): **{claim_verdict(len(learnt) == len(sfa_labels), bool(learnt))}**.")
        by_p = sorted(((runs[l]["method"].get("p", 1.0), final[l][old]) for l in sfa_labels), reverse=True)
        monotone = all(b[1] >= a[1] - 0.02 for a, b in zip(by_p, by_p[1:]))
        verdicts.append("- Averaging more often (smaller p) keeps more of the old task (old-task score by p: "
                        + ", ".join(f"p={p:g}: {s:.2f}" for p, s in by_p) + f"): **{claim_verdict(monotone)}**.")
    averages = {label: run["average_accuracy"] for label, run in runs.items()}
    best_sfa = max((averages[l] for l in sfa_labels), default=None)
    penalties = {l: a for l, a in averages.items() if kind[l] in ("l2", "ewc")}
    if best_sfa is not None and penalties:
        ok = best_sfa >= max(penalties.values()) - 0.005
        verdicts.append(f"- SFA matches or beats the L2/EWC penalties (average accuracy: best SFA {best_sfa:.3f}; "
                        + ", ".join(f"{l} {a:.3f}" for l, a in penalties.items()) + f"): **{claim_verdict(ok)}**.")
    return lines, verdicts


def sfa_digits_section(result: dict) -> tuple[list[str], list[str]]:
    from mergelab.studies.digits import digits_verdict
    from mergelab.continual.report import stream_table

    lines, verdicts = [], []
    for scenario, data in result["scenarios"].items():
        lines += [f"**{scenario}-incremental**", "", stream_table(data),
                  f"![split digits {scenario}](sfa-digits/split_digits_{scenario}.png)", ""]
        comparison = data["comparison"]
        best = comparison.get("best", {})
        ok = None
        if "sfa" in best and any(k in best for k in ("l2", "ewc")):
            ok = all(best["sfa"]["average_accuracy"] >= best[k]["average_accuracy"] - 0.005
                     for k in ("l2", "ewc") if k in best)
        verdicts.append(f"- Split digits, {scenario}-incremental — SFA matches or beats L2/EWC (the paper's "
                        f"Figure 1): **{claim_verdict(ok)}**. {digits_verdict(comparison)}.")
    return lines, verdicts


def write_demo_report(results: dict, out) -> None:
    """``OUT/report.md`` from the demo's results."""
    from pathlib import Path

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
    ]
    cocktail_lines, cocktail_claims = cocktail_section(results["cocktail"])
    grid_lines, grid_claims = grid_section(results["grid"], grid_table(results["grid"]))
    sfa_lines, sfa_claims = sfa_lm_section(results["sfa_lm"])
    digit_lines, digit_claims = sfa_digits_section(results["sfa_digits"])
    sections += ["## 1. LM-Cocktail (Xiao et al.): resilient tuning by merging", "",
                 "Scores are test accuracy on the target task / mean over the eleven other tasks.", "",
                 *cocktail_lines, "", *cocktail_claims, "",
                 "## 2. Merging at scale (Yadav et al.): the grid", "",
                 "Normalized performance: held-in ÷ the task's expert, held-out ÷ the base; mean within category, "
                 "across categories, then over 2 seeds (± std over seeds).", "", *grid_lines, "", *grid_claims, "",
                 "## 3. Soup to go (SFA)", "", "### On the demo LM", "", *sfa_lines, "", *sfa_claims, "",
                 "### On split digits", "", *digit_lines, *digit_claims, "",
                 "## Verdicts, all claims", "", *cocktail_claims, *grid_claims, *sfa_claims, *digit_claims, "",
                 "## Reproduce", "",
                 "```bash",
                 "mergelab demo --out mergelab-demo            # everything above",
                 "mergelab grid --demo --out grid-demo         # part 2 alone",
                 "mergelab sfa --digits --out sfa-digits       # split digits alone",
                 f"mergelab sfa {out / 'sfa-inputs' / 'spec.yml'} --out sfa-lm   # part 3 on the LM",
                 "mergelab cocktail sweep sweep --finetuned <world>/models/expert-add --base <world>/models/base "
                 "--tasks <world>/tasks-test.yml --target add",
                 "```", ""]
    (out / "report.md").write_text("\n".join(sections))
