"""Continual-learning metrics over an accuracy matrix (one implementation, shared by the SFA
runner, the grid and the demo).

``matrix[i][j]`` is the score on task j after training stage i (stages and tasks in the same
order, so ``matrix[j][j]`` is task j's score right after it was learned).
"""

from __future__ import annotations

from typing import Sequence

from mergelab.errors import MergelabError


def _check(matrix: Sequence[Sequence[float]]) -> int:
    stages = len(matrix)
    if stages == 0:
        raise MergelabError("the accuracy matrix is empty; evaluate after at least one stage")
    for row in matrix:
        if len(row) != stages:
            raise MergelabError(f"the accuracy matrix must be square (stages × tasks), got a row of {len(row)} "
                             f"scores for {stages} stages")
    return stages


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Mean score over all tasks after the last stage."""
    stages = _check(matrix)
    return sum(matrix[-1]) / stages


def forgetting(matrix: Sequence[Sequence[float]]) -> list[float]:
    """Per task j (all but the last): score right after learning j minus score at the end.

    Positive means the task was forgotten. (DESIGN.md's definition; Chaudhry et al.'s variant
    takes the best earlier score instead of the one right after learning.)
    """
    stages = _check(matrix)
    return [matrix[j][j] - matrix[-1][j] for j in range(stages - 1)]


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float:
    values = forgetting(matrix)
    return sum(values) / len(values) if values else 0.0


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean over j < T of (score at the end − score right after j)."""
    values = forgetting(matrix)
    return -sum(values) / len(values) if values else 0.0


def continual_summary(matrix: Sequence[Sequence[float]]) -> dict[str, object]:
    """All of the above in one dict (JSON-ready)."""
    return {
        "accuracy_matrix": [list(map(float, row)) for row in matrix],
        "average_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "average_forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
    }
