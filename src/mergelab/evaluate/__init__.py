"""Evaluation: tasks, evaluators for transformers decoders and encoders, normalized
performance, and continual-learning metrics."""

from mergelab.evaluate.continual import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_summary,
    forgetting,
)
from mergelab.evaluate.normalized import aggregate_seeds, normalize, normalized_performance
from mergelab.evaluate.runner import evaluate_model, evaluate_models, evaluate_task, load_for_tasks, write_rows
from mergelab.evaluate.tasks import Task, load_tasks, make_task

__all__ = [
    "Task", "load_tasks", "make_task", "evaluate_model", "evaluate_models", "evaluate_task", "load_for_tasks",
    "write_rows", "normalized_performance", "normalize", "aggregate_seeds", "average_accuracy", "forgetting",
    "average_forgetting", "backward_transfer", "continual_summary",
]
