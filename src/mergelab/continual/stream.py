"""Train one model on a stream of tasks with SFA or a baseline, evaluating every task after
every stage.

The runner is model-agnostic: a ``Harness`` says how to batch examples, compute the loss and
score the model, so the same code drives the split-digits MLP and transformers causal LMs.

Every method starts from the same first stage (plain fine-tuning on task 1, computed once and
shared, as in the paper where all methods start from one initial model); from the second
task on, each stage is what the method's registry entry (``mergelab.continual.methods``) says:
how it trains (from the previous stage or the initial model, with a penalty, an averaging
hook or mixed-in old examples) and what it does at the end (e.g. merge per-task models).

Results per method: the accuracy matrix and its summary (``mergelab.evaluate.continual``) and
the L2 distance of each stage's model to every earlier stage's (the paper's Table 2).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mergelab.continual.baselines import Rehearsal, empirical_fisher
from mergelab.continual.methods import Method, Stage, Training
from mergelab.continual.state import l2_distance, restore, snapshot
from mergelab.errors import MergelabError
from mergelab.evaluate.continual import continual_summary
from mergelab.lm import fit
from mergelab.threads import Threads, module_params, use_threads


@dataclass
class StreamTask:
    """One task of the stream: a name, training examples, and (for the evaluator) held-out ones."""

    name: str
    train: Sequence[Any]
    eval: Sequence[Any] = ()


@dataclass
class TrainSettings:
    """How each stage is trained (shared by every method so that they are comparable)."""

    steps: int | Sequence[int] = 100  # per task, or one number per task
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"  # or "sgd"
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    seed: int = 0

    def steps_for(self, stage: int) -> int:
        return self.steps if isinstance(self.steps, int) else int(self.steps[stage])


@dataclass
class Harness:
    """What the runner needs to know about the model and data.

    Args:
        loss: ``loss(model, batch) -> scalar tensor``.
        collate: list of examples -> batch (on the model's device).
        evaluate: ``evaluate(model, stage) -> {task name: score}`` (higher is better), called
            after every stage with the model in eval mode; swap it for any evaluator.
    """

    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    collate: Callable[[list], Any]
    evaluate: Callable[[torch.nn.Module, int], dict[str, float]]


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    raise MergelabError(f"optimizer must be 'adamw' or 'sgd', got {settings.optimizer!r}")


def batch_drawer(examples: Sequence[Any], settings: TrainSettings, collate, key: str,
                 rehearsal: Rehearsal | None = None) -> Callable[[], Any]:
    """Seeded batches of ``examples``: the same key gives the same batches in every method."""
    rng = random.Random(f"{settings.seed}:{key}")
    size = min(settings.batch_size, len(examples))
    if rehearsal is not None:
        return lambda: collate(rehearsal.draw(examples, settings.batch_size, rng))
    return lambda: collate(rng.sample(examples, size))


class StreamRunner:
    """Runs several methods over one task stream, sharing the first stage and the per-task models."""

    def __init__(self, model: torch.nn.Module, tasks: Sequence[StreamTask], settings: TrainSettings,
                 harness: Harness, log: Callable[[str], None] | None = None, workdir: str | Path | None = None):
        if not tasks:
            raise MergelabError("the task list is empty; give at least one task (two to measure forgetting)")
        for task in tasks:
            if not task.train:
                raise MergelabError(f"task '{task.name}' has no training examples")
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise MergelabError(f"task names must be unique, got {names}")
        steps = [settings.steps] if isinstance(settings.steps, int) else list(settings.steps)
        if not isinstance(settings.steps, int) and len(steps) != len(tasks):
            raise MergelabError(f"steps lists {len(steps)} numbers for {len(tasks)} tasks; give one per task or one "
                                f"number")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise MergelabError(f"steps must be integers of at least 1 (optimizer steps per task), got "
                                f"{settings.steps}")
        self.model, self.tasks, self.settings, self.harness = model, list(tasks), settings, harness
        self.log = log or (lambda _: None)
        self.workdir = Path(workdir) if workdir else None
        self.base = snapshot(model)
        self._experts: dict[int, dict[str, torch.Tensor]] = {}
        self._initial: tuple[dict[str, torch.Tensor], list[float]] | None = None

    # -- what the methods use ------------------------------------------------------------------
    def train(self, training: Training, stage: int) -> None:
        """Train the model as ``training`` says (seeded by the stage and the batch key)."""
        if training.start_from is not None:
            restore(self.model, training.start_from)
        torch.manual_seed(self.settings.seed * 1000 + stage)
        draw = batch_drawer(training.examples, self.settings, self.harness.collate, training.key, training.rehearsal)
        fit(self.model, draw, training.steps, self.harness.loss, make_optimizer(self.model, self.settings),
            penalty=training.penalty, after_step=training.after_step)

    def stage_key(self, stage: int) -> str:
        return f"stage{stage}:{self.tasks[stage].name}"

    def expert(self, stage: int) -> dict[str, torch.Tensor]:
        """The starting model fine-tuned on task ``stage`` alone (cached); the one for task 0 is
        the shared first stage, the others are the post-hoc baselines' per-task models."""
        if stage not in self._experts:
            self.train(Training(self.tasks[stage].train, self.settings.steps_for(stage), self.stage_key(stage),
                                start_from=self.base), stage)
            self._experts[stage] = snapshot(self.model)
            self.log(f"  per-task model for '{self.tasks[stage].name}' trained")
        return self._experts[stage]

    def fisher(self, examples: Sequence[Any], samples: int | None, seed: int) -> dict[str, torch.Tensor]:
        """The diagonal Fisher of the model as it is, on a seeded sample of ``examples``."""
        return empirical_fisher(self.model, examples, self.harness.loss, self.harness.collate, samples, seed=seed)

    # -- stages ------------------------------------------------------------------------------
    def _scores(self, stage: int) -> list[float]:
        self.model.eval()
        scores = self.harness.evaluate(self.model, stage)
        missing = [task.name for task in self.tasks if task.name not in scores]
        if missing:
            raise MergelabError(f"the evaluator returned no score for task '{missing[0]}' (it returned "
                                f"{sorted(scores)}); it must score every task of the stream")
        return [float(scores[task.name]) for task in self.tasks]

    def initial(self) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Stage 0, shared by every method: plain fine-tuning on the first task."""
        if self._initial is None:
            state = self.expert(0)
            restore(self.model, state)
            self._initial = (state, self._scores(0))
        return self._initial

    def run(self, method: Method) -> dict[str, Any]:
        """Every stage of one method; returns its results (JSON-ready)."""
        state0, row0 = self.initial()  # shared, so not in this method's seconds
        started = time.perf_counter()
        states, rows = [state0], [row0]
        memory: dict[str, Any] = {}
        diverged = None
        for index in range(1, len(self.tasks)):
            restore(self.model, states[-1])
            stage = Stage(self, method, index, states[-1], memory)
            training = method.entry.start(stage)
            if training is not None:
                self.train(training, index)
            if method.entry.end is not None:
                method.entry.end(stage)
            rows.append(self._scores(index))
            states.append(snapshot(self.model))
            if diverged is None and not all(bool(torch.isfinite(t).all()) for t in states[-1].values()
                                            if t.dtype.is_floating_point):
                diverged = self.tasks[index].name
                self.log(f"  {method.title}: training diverged on task '{diverged}' (non-finite weights); "
                         f"lower the learning rate or lambda")
            self.log(f"  {method.title}: stage {index + 1}/{len(self.tasks)} "
                     + " ".join(f"{t.name}={s:.3f}" for t, s in zip(self.tasks, rows[-1])))
        distances = [[l2_distance(states[i], states[j]) for j in range(i)] for i in range(len(states))]
        return {"label": method.title, "method": method.to_dict(), **continual_summary(rows),
                "l2_distance": distances, "diverged": diverged, "seconds": time.perf_counter() - started}


def run_stream(model: torch.nn.Module, tasks: Sequence[StreamTask], methods: Sequence[Method] | Method,
               settings: TrainSettings, harness: Harness, log: Callable[[str], None] | None = None,
               workdir: str | Path | None = None, threads: Threads = "auto") -> dict[str, Any]:
    """Train ``model`` on ``tasks`` in order with each method and evaluate after every stage.

    Args:
        model: the starting model (restored between methods; left holding the last method's
            final weights).
        tasks: the stream, in order.
        methods: one ``Method`` or several (they share the first stage).
        settings: steps, batch size, optimizer, seed.
        harness: loss, batching and the evaluator.
        threads: torch CPU threads, a number or "auto" (``mergelab.threads``).

    Returns:
        ``{"tasks": [...], "initial": scores after stage 1, "runs": [per-method results]}``
        where each run holds ``accuracy_matrix``, ``average_accuracy``, ``forgetting``,
        ``average_forgetting``, ``bwt``, ``l2_distance`` (``[i][j]``: stage i to stage j < i),
        ``diverged`` (the task during which the weights became non-finite, else None).

    Example:
        >>> results = run_stream(model, [task_a, task_b], [Method("sequential"), Method("sfa", p=0.25)],
        ...                      TrainSettings(steps=200), harness)  # doctest: +SKIP
    """
    methods = [methods] if isinstance(methods, Method) else list(methods)
    if not methods:
        raise MergelabError("no methods to run; give at least one (e.g. sequential and sfa)")
    runner = StreamRunner(model, tasks, settings, harness, log, workdir)
    with use_threads(threads, work_params=module_params(model)):
        runs = [runner.run(method) for method in methods]
        _, initial_scores = runner.initial()
    names = [task.name for task in runner.tasks]
    return {"tasks": names, "initial": dict(zip(names, initial_scores)), "runs": runs}
