"""Result files of a stream or of the split-digits experiment: JSON, a markdown table and
task-plane plots (first task's score against the last task's, as in the paper's Figures 1–4),
written into a directory that appears only once everything is written."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from mergelab.continual.methods import CONTINUAL_METHODS, ContinualMethod
from mergelab.io import atomic_directory

# A family's curves share its colour (mergelab.plots.method_color); its second, third... curve
# takes the next of these line styles.
LINE_STYLES = ["-", "--", ":", "-."]


def method_colour(entry: ContinualMethod) -> str:
    """The registry's colour when it sets one, else the method's colour in every mergelab figure."""
    from mergelab.plots import method_color

    return entry.color or method_color(entry.name)


def model_title(model: str | Path) -> str:
    """A model's name for titles: the directory's name, never the path to it (a local cache)."""
    text = str(model).rstrip("/")
    return Path(text).name if "/" in text or Path(text).is_dir() else text


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
def stream_table(result: dict[str, Any]) -> str:
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


def _entry(run: dict[str, Any]) -> ContinualMethod:
    return CONTINUAL_METHODS[run["method"]["name"]]


def plane_panels(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(parameter to vary, title) per panel: for each method with several sweep parameters that
    ran, its first one, and each other one that takes more than one value among ``runs``."""
    panels = []
    for entry in CONTINUAL_METHODS.values():
        mine = [run for run in runs if run["method"]["name"] == entry.name]
        if len(entry.sweeps) < 2 or not mine:
            continue
        for number, param in enumerate(entry.sweeps):
            if number == 0 or len({run["method"][param.name] for run in mine}) > 1:
                others = ", ".join(p.label for p in entry.sweeps if p is not param)
                panels.append((param.name, f"{entry.short} over {param.label} (one curve per {others})"))
    return panels or [(next(e for e in CONTINUAL_METHODS.values() if e.sweeps).sweeps[0].name, "task plane")]


def _curves(runs: list[dict[str, Any]], vary: str) -> dict[str, tuple[ContinualMethod, list[tuple[float, str, dict]]]]:
    """Runs of the methods with sweep parameters grouped into curves: a method with one sweep
    parameter is one curve over it; one with several is one curve over ``vary`` per value of
    the others. Values: (entry, [(sort key, annotation, run)])."""
    curves: dict[str, tuple[ContinualMethod, list]] = {}
    for run in runs:
        entry, values = _entry(run), run["method"]
        sweeps = entry.sweeps
        if not sweeps or (len(sweeps) > 1 and entry.param(vary) not in sweeps):
            continue
        over = sweeps[0] if len(sweeps) == 1 else entry.param(vary)
        fixed = " ".join(f"{p.label}={values[p.name]:g}" for p in sweeps if p is not over)
        key = f"{entry.short} {fixed}".strip()
        curves.setdefault(key, (entry, []))[1].append((values[over.name], f"{over.label}={values[over.name]:g}", run))
    return curves


def plot_task_plane(ax, result: dict[str, Any], vary: str = "p", title: str | None = None) -> None:
    """Draw one panel: curves for the swept methods (SFA one per fixed β or p, L2 and EWC over λ),
    points for the rest."""
    tasks = result["tasks"]
    initial = [result["initial"][t] for t in tasks]
    x, y = plane_point(result, initial)
    ax.scatter([x], [y], marker="o", color="navy", s=60, zorder=3, label="after task 1")
    curves = _curves(result["runs"], vary)
    longest = {}  # per several-parameter method: its longest curve in this panel
    for entry, members in curves.values():
        if len(entry.sweeps) > 1:
            longest[entry.name] = max(longest.get(entry.name, 0), len(members))
    drawn: dict[str, int] = defaultdict(int)  # curves drawn per family
    for key, (entry, members) in curves.items():
        if entry.name in longest:
            if len(members) < max(2, longest[entry.name]):  # only the sweeps this panel is about
                continue
        color = method_colour(entry)
        line = entry.line if drawn[entry.name] == 0 else LINE_STYLES[drawn[entry.name] % len(LINE_STYLES)]
        drawn[entry.name] += 1
        members.sort(key=lambda member: member[0])
        points = [plane_point(result, run["accuracy_matrix"][-1]) for _, _, run in members]
        ax.plot([p[0] for p in points], [p[1] for p in points], line, marker=".", color=color, label=key)
        for (px, py), (_, note, _) in zip(points, members):
            ax.annotate(note, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
    for run in result["runs"]:
        entry = _entry(run)
        px, py = plane_point(result, run["accuracy_matrix"][-1])
        if len(entry.sweeps) > 1 and longest.get(entry.name, 0) < 2:  # no sweep at all: single points
            ax.scatter([px], [py], marker="o", s=25, facecolors="none", edgecolors=method_colour(entry), zorder=3)
            ax.annotate(run["label"], (px, py), fontsize=6, xytext=(3, -8), textcoords="offset points",
                        color=method_colour(entry))
        elif not entry.sweeps:
            ax.scatter([px], [py], marker=entry.marker, color=method_colour(entry), s=70, zorder=3,
                       label=run["label"])
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
    """A PNG with one task-plane panel per (parameter to vary, title)."""
    from mergelab.plots import new_figure, save_figure

    fig, axes = new_figure(len(panels), (5.2 * len(panels), 4.8))
    for ax, (vary, title) in zip(axes, panels):
        plot_task_plane(ax, result, vary, title)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    save_figure(fig, path, dpi=130)
