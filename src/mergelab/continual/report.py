"""Result files of a stream or of the split-digits experiment: JSON, a markdown table and
task-plane plots (first task's score against the last task's, as in the paper's Figures 1–4),
written into a directory that appears only once everything is written."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from mergelab.io import atomic_directory

# Marker and colour of the single points, after the paper's figures.
POINTS = {"sequential": ("o", "red"), "multitask": ("*", "black"), "rehearsal": ("D", "hotpink"),
          "task_arithmetic": ("s", "tab:blue"), "ties": ("^", "tab:green")}
CURVES = {"l2": ("--", "tab:green"), "ewc": (":", "tab:red")}
SFA_COLORS = ["tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:gray", "tab:pink"]


def write_outputs(out_dir: str | Path, writers: dict[str, Callable[[Path], None]], force: bool = False) -> Path:
    """Call ``writers[name](path)`` for each file inside a temporary sibling of ``out_dir`` and
    rename it into place only when all succeeded (a failure leaves no half-written results)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force) as tmp:
        for name, write in writers.items():
            write(tmp / name)
    return out_dir


def write_json(data: Any) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(_finite(data), indent=2) + "\n")


def _finite(value: Any) -> Any:
    """NaN/Inf become null so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- tables ------------------------------------------------------------------------------------
def markdown_table(result: dict[str, Any]) -> str:
    """One row per run: final score per task (± std over seeds when known), average accuracy,
    average forgetting, BWT, L2 distance of the final model to the previous stage's, seconds."""
    tasks = result["tasks"]
    header = ["method", *[f"{t} final" for t in tasks], "avg acc", "avg forgetting", "BWT", "L2 to prev", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    initial = result.get("initial")
    if initial:
        lines.append("| after task 1 (shared) | " + " | ".join(f"{initial[t]:.3f}" for t in tasks)
                     + " | | | | | |")
    for run in result["runs"]:
        final = run["accuracy_matrix"][-1]
        spread = run.get("final_std")
        cells = [f"{score:.3f}" + (f" ± {spread[i]:.3f}" if spread else "") for i, score in enumerate(final)]
        distance = run["l2_distance"][-1][-1] if len(run["l2_distance"]) > 1 else float("nan")
        label = run["label"] + (f" (diverged on {run['diverged']})" if run.get("diverged") else "")
        lines.append("| " + " | ".join([label, *cells, f"{run['average_accuracy']:.3f}",
                                         f"{run['average_forgetting']:.3f}", f"{run['bwt']:.3f}", f"{distance:.2f}",
                                         f"{run['seconds']:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


# -- task-plane plots -------------------------------------------------------------------------------
def plane_point(result: dict[str, Any], scores: list[float]) -> tuple[float, float]:
    """(x, y) = (last task's score, first task's score); with more than two tasks y is the
    mean over all earlier tasks."""
    earlier = scores[:-1] or scores
    return scores[-1], sum(earlier) / len(earlier)


def _curves(runs: list[dict[str, Any]], sfa_vary: str) -> dict[str, list[tuple[float, str, dict]]]:
    """Runs grouped into curves: SFA by the fixed parameter (varying ``sfa_vary``), L2 and EWC
    over λ. Values: (sort key, annotation, run)."""
    curves: dict[str, list] = defaultdict(list)
    for run in runs:
        method = run["method"]
        if method["name"] == "sfa":
            fixed = "beta" if sfa_vary == "p" else "p"
            symbol = {"beta": "β", "p": "p"}
            key = f"SFA {symbol[fixed]}={method[fixed]:g}"
            curves[key].append((method[sfa_vary], f"{symbol[sfa_vary]}={method[sfa_vary]:g}", run))
        elif method["name"] in ("l2", "ewc"):
            curves[method["name"].upper()].append((method["lam"], f"λ={method['lam']:g}", run))
    return curves


def plot_task_plane(ax, result: dict[str, Any], sfa_vary: str = "p", title: str | None = None) -> None:
    """Draw one panel: curves for SFA (one per fixed β or p), L2 and EWC, points for the rest."""
    tasks = result["tasks"]
    initial = [result["initial"][t] for t in tasks]
    x, y = plane_point(result, initial)
    ax.scatter([x], [y], marker="o", color="navy", s=60, zorder=3, label="after task 1")
    curves = _curves(result["runs"], sfa_vary)
    longest = max((len(m) for k, m in curves.items() if k.startswith("SFA")), default=0)
    sfa_curves = 0
    for key, members in curves.items():
        if key.startswith("SFA"):
            if len(members) < max(2, longest):  # only the sweeps this panel is about
                continue
            style, color = "-", SFA_COLORS[sfa_curves % len(SFA_COLORS)]
            sfa_curves += 1
        else:
            style, color = CURVES[key.lower()]
        members.sort(key=lambda member: member[0])
        points = [plane_point(result, run["accuracy_matrix"][-1]) for _, _, run in members]
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker=".", color=color, label=key)
        for (px, py), (_, note, _) in zip(points, members):
            ax.annotate(note, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
    for run in result["runs"]:  # no SFA sweep at all: SFA settings as single points
        if run["method"]["name"] == "sfa" and longest < 2:
            px, py = plane_point(result, run["accuracy_matrix"][-1])
            ax.scatter([px], [py], marker="o", s=25, facecolors="none", edgecolors="tab:orange", zorder=3)
            ax.annotate(run["label"], (px, py), fontsize=6, xytext=(3, -8), textcoords="offset points",
                        color="tab:orange")
    for run in result["runs"]:
        if run["method"]["name"] in POINTS:
            marker, color = POINTS[run["method"]["name"]]
            px, py = plane_point(result, run["accuracy_matrix"][-1])
            ax.scatter([px], [py], marker=marker, color=color, s=70, zorder=3, label=run["label"])
    earlier = tasks[0] if len(tasks) == 2 else f"mean of {', '.join(tasks[:-1])}"
    ax.set_xlabel(f"{tasks[-1]} score (last task)")
    ax.set_ylabel(f"{earlier} score")
    every = [v for run in result["runs"] for v in run["accuracy_matrix"][-1]] + initial
    if all(0.0 <= v <= 1.0 for v in every):  # accuracies: show the whole unit square
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower left")


def save_plane_figure(path: Path, result: dict[str, Any], panels: list[tuple[str, str]], suptitle: str = "") -> None:
    """A PNG with one task-plane panel per (sfa_vary, title)."""
    from mergelab.plots import new_figure, save_figure

    fig, axes = new_figure(len(panels), (5.2 * len(panels), 4.8))
    for ax, (sfa_vary, title) in zip(axes, panels):
        plot_task_plane(ax, result, sfa_vary, title)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    save_figure(fig, path, dpi=130)
