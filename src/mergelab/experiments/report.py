"""Grid summaries: normalized held-in / held-out per (method, n_experts), averaged over seeds
the way merging-at-scale does (within category, across categories, then across seeds), as a
markdown table and as the paper's Figure 2-style plot."""

from __future__ import annotations

import json
from pathlib import Path

from mergelab.evaluate import aggregate_seeds, normalized_performance


def _references(rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    base = {r["task"]: float(r["score"]) for r in rows if r["method"] == "base"}
    expert = {r["task"]: float(r["score"]) for r in rows if r["method"] == "expert"}
    return base, expert


def summarize(rows: list[dict], tasks) -> dict:
    """``{"cells": {method: {n: {split: {mean, std, seeds}}}}, "multitask": {split: value}, "problems": [...]}``."""
    base, expert = _references(rows)
    by_task = {t.name: t for t in tasks}
    runs: dict[tuple[str, int], list[dict]] = {}
    problems: list[str] = []
    groups: dict[tuple[str, int, int], dict[str, float]] = {}
    for row in rows:
        if row["method"] in ("base", "expert", "multitask"):
            continue
        key = (row["method"], int(row["n_experts"]), int(row["seed"]))
        groups.setdefault(key, {})[row["task"]] = float(row["score"])
    for (method, n, seed), scores in sorted(groups.items()):
        result = normalized_performance(scores, [by_task[name] for name in scores], expert, base)
        problems += result["problems"]
        runs.setdefault((method, n), []).append(result)
    cells: dict[str, dict[int, dict]] = {}
    for (method, n), results in runs.items():
        cells.setdefault(method, {})[n] = aggregate_seeds(results)
    summary = {"cells": cells, "multitask": None, "problems": sorted(set(problems))}
    multitask = {r["task"]: float(r["score"]) for r in rows if r["method"] == "multitask"}
    if multitask:
        summary["multitask"] = normalized_performance(multitask, [by_task[n] for n in multitask], expert,
                                                      base)["splits"]
    return summary


def markdown_table(summary: dict) -> str:
    lines = ["| method | n_experts | held-in (normalized) | held-out (normalized) | seeds |", "|---|---|---|---|---|"]
    for method, by_n in summary["cells"].items():
        for n, splits in sorted(by_n.items()):
            cells = [f"{splits[s]['mean']:.3f} ± {splits[s]['std']:.3f}" if s in splits else "-"
                     for s in ("held_in", "held_out")]
            seeds = max(v["seeds"] for v in splits.values())
            lines.append(f"| {method} | {n} | {cells[0]} | {cells[1]} | {seeds} |")
    if summary["multitask"]:
        mt = summary["multitask"]
        lines.append(f"| multitask (reference) | all | {mt.get('held_in', float('nan')):.3f} | "
                     f"{mt.get('held_out', float('nan')):.3f} | - |")
    return "\n".join(lines)


def plot_grid(summary: dict, path: Path) -> Path:
    """Normalized held-in and held-out vs number of experts, one line per method."""
    from mergelab.plots import integer_ticks, method_color, new_figure, save_figure

    figure, axes = new_figure(2, (9, 3.6))
    for axis, split, title in ((axes[0], "held_in", "held-in tasks"), (axes[1], "held_out", "held-out tasks")):
        for method, by_n in summary["cells"].items():
            ns = sorted(n for n in by_n if split in by_n[n])
            means = [by_n[n][split]["mean"] for n in ns]
            stds = [by_n[n][split]["std"] for n in ns]
            axis.errorbar(ns, means, yerr=stds, marker="o", capsize=3, label=method, color=method_color(method))
        if summary["multitask"] and split in summary["multitask"]:
            axis.axhline(summary["multitask"][split], color=method_color("multitask"), linestyle="--",
                         label="multitask")
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("number of experts merged")
        integer_ticks(axis)
        axis.set_ylabel("normalized performance")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return save_figure(figure, path)


def write_report(rows: list[dict], tasks, out_dir: Path) -> dict:
    """summary.json, table.md and grid.png in ``out_dir``."""
    summary = summarize(rows, tasks)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown_table(summary) + "\n")
    if summary["cells"]:
        plot_grid(summary, out_dir / "grid.png")
    return summary
