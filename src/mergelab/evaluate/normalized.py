"""Normalized performance (merging-at-scale §3): held-in scores ÷ the task's expert, held-out
÷ the base model; mean within each category, then across categories, then across seeds.

A reference that is missing or zero is reported in ``problems`` and its task left out of
the means, never divided by silently.
"""

from __future__ import annotations

from statistics import mean, pstdev
from typing import Iterable, Mapping

from mergelab.evaluate.tasks import LOWER_IS_BETTER


def normalize(score: float, reference: float, metric: str = "accuracy") -> float:
    """score / reference, or reference / score for a lower-is-better metric (loss)."""
    return reference / score if metric in LOWER_IS_BETTER else score / reference


def normalized_performance(scores: Mapping[str, float], tasks: Iterable, expert_scores: Mapping[str, float],
                           base_scores: Mapping[str, float], held_in: str = "held_in") -> dict:
    """Normalize one model's task scores and aggregate them.

    Args:
        scores: task name -> the evaluated model's score.
        tasks: objects (``Task``) or dicts with ``name``, ``category``, ``split`` and ``metric``.
        expert_scores: task name -> that task's expert's score (reference for held-in tasks).
        base_scores: task name -> the base model's score (reference for everything else).
        held_in: the split label of held-in tasks.

    Returns:
        ``{"tasks": {name: {score, reference, normalized, split, category}}, "categories":
        {split: {category: mean}}, "splits": {split: mean over categories}, "problems": [...]}``.
    """
    per_task, problems = {}, []
    grouped: dict[str, dict[str, list[float]]] = {}
    for task in tasks:
        info = task if isinstance(task, Mapping) else task.model_dump()
        name, split = info["name"], info["split"]
        references = expert_scores if split == held_in else base_scores
        who = "expert" if split == held_in else "base model"
        if name not in scores:
            problems.append(f"task '{name}': no score for the model")
            continue
        reference = references.get(name)
        value = None
        if reference is None:
            problems.append(f"task '{name}': no {who} score to normalize by")
        elif reference == 0 or (info.get("metric") in LOWER_IS_BETTER and scores[name] == 0):
            problems.append(f"task '{name}': the {who} scores 0, so the normalized score is undefined")
        else:
            value = normalize(scores[name], reference, info.get("metric", "accuracy"))
            grouped.setdefault(split, {}).setdefault(info.get("category", "default"), []).append(value)
        per_task[name] = {"score": scores[name], "reference": reference, "normalized": value, "split": split,
                          "category": info.get("category", "default")}
    categories = {split: {c: mean(v) for c, v in cats.items()} for split, cats in grouped.items()}
    splits = {split: mean(cats.values()) for split, cats in categories.items()}
    return {"tasks": per_task, "categories": categories, "splits": splits, "problems": problems}


def aggregate_seeds(results: Iterable[Mapping]) -> dict[str, dict[str, float]]:
    """Mean and spread across seeds of each split's normalized performance."""
    by_split: dict[str, list[float]] = {}
    for result in results:
        for split, value in result["splits"].items():
            by_split.setdefault(split, []).append(value)
    return {split: {"mean": mean(v), "std": pstdev(v), "seeds": len(v)} for split, v in by_split.items()}
