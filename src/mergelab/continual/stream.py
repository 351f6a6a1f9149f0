"""Train one model on a stream of tasks with SFA or a baseline, evaluating every task after
every stage.

The runner is model-agnostic: a ``Harness`` says how to batch examples, compute the loss and
score the model, so the same code drives the split-digits MLP and transformers causal LMs.

Every method starts from the same first stage (plain fine-tuning on task 1, computed once and
shared, as in the paper where all methods start from one initial model); from the second
task on:

* ``sequential``: plain fine-tuning on the new task;
* ``sfa``: plain fine-tuning with ``SFA.maybe_average`` after every step, θ_o = previous stage;
* ``l2`` / ``ewc``: the task loss plus the penalty toward the previous stage (EWC's Fisher is
  estimated on each finished task at the model right after it and summed over tasks);
* ``rehearsal``: batches mixing ``fraction`` of the earlier tasks' training data;
* ``multitask``: stage i retrains from the initial model on the union of tasks 1..i for as
  many steps as the sequential run has taken so far (the upper baseline, not continual);
* ``task_arithmetic`` / ``ties``: stage i merges per-task models (each fine-tuned from the
  initial model on its task alone) with the merge core.

Results per method: the accuracy matrix and its summary (``mergelab.evaluate.continual``) and
the L2 distance of each stage's model to every earlier stage's (the paper's Table 2).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mergelab.continual.baselines import EWCPenalty, L2Penalty, Rehearsal, check_strength, empirical_fisher, union
from mergelab.continual.posthoc import POSTHOC_METHODS, load_checkpoint, merge_task_models, save_checkpoint
from mergelab.continual.sfa import SFA, check_beta, check_p
from mergelab.continual.state import l2_distance, restore, snapshot
from mergelab.errors import MergelabError
from mergelab.evaluate.continual import continual_summary
from mergelab.lm import fit

METHOD_NAMES = ("sequential", "sfa", "l2", "ewc", "rehearsal", "multitask", *POSTHOC_METHODS)


@dataclass
class Task:
    """One task of the stream: a name, training examples, and (for the evaluator) held-out ones."""

    name: str
    train: Sequence[Any]
    eval: Sequence[Any] = ()


@dataclass
class Method:
    """A continual-learning method and its hyperparameters (only those of its kind are used)."""

    name: str
    p: float = 0.25  # sfa
    beta: float = 0.5  # sfa
    lam: float = 1.0  # l2, ewc
    fraction: float = 0.1  # rehearsal
    buffer_size: int | None = None  # rehearsal
    fisher_samples: int | None = 200  # ewc
    merge_parameters: dict[str, Any] = field(default_factory=dict)  # task_arithmetic, ties
    label: str | None = None

    def check(self) -> "Method":
        if self.name not in METHOD_NAMES:
            raise MergelabError(f"unknown continual method '{self.name}'; choose one of: {', '.join(METHOD_NAMES)}")
        if self.name == "sfa":
            check_p(self.p)
            check_beta(self.beta)
        if self.name in ("l2", "ewc"):
            check_strength(self.lam, self.name)
        if self.name == "rehearsal" and not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise MergelabError(f"rehearsal fraction must be in (0, 1), got {self.fraction!r}")
        return self

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        return {
            "sfa": f"SFA p={self.p:g} β={self.beta:g}",
            "l2": f"L2 λ={self.lam:g}",
            "ewc": f"EWC λ={self.lam:g}",
            "rehearsal": f"rehearsal {self.fraction:.0%}",
            "task_arithmetic": "task arithmetic",
            "ties": "TIES",
        }.get(self.name, self.name)

    def to_dict(self) -> dict[str, Any]:
        used = {"sfa": ("p", "beta"), "l2": ("lam",), "ewc": ("lam", "fisher_samples"),
                "rehearsal": ("fraction", "buffer_size"), "task_arithmetic": ("merge_parameters",),
                "ties": ("merge_parameters",)}.get(self.name, ())
        values = asdict(self)
        return {"name": self.name, **{key: values[key] for key in used}}


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

    def __init__(self, model: torch.nn.Module, tasks: Sequence[Task], settings: TrainSettings, harness: Harness,
                 log: Callable[[str], None] | None = None, workdir: str | Path | None = None):
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
            raise MergelabError(f"steps lists {len(steps)} numbers for {len(tasks)} tasks; give one per task or one number")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise MergelabError(f"steps must be integers of at least 1 (optimizer steps per task), got {settings.steps}")
        self.model, self.tasks, self.settings, self.harness = model, list(tasks), settings, harness
        self.log = log or (lambda _: None)
        self.workdir = Path(workdir) if workdir else None
        self.base = snapshot(model)
        self._experts: dict[int, dict[str, torch.Tensor]] = {}
        self._initial: tuple[dict[str, torch.Tensor], list[float]] | None = None
        self._fisher_sum: dict[str, torch.Tensor] = {}  # EWC: Σ of the Fishers of the finished tasks

    # -- one stage ---------------------------------------------------------------------------
    def _train(self, examples: Sequence[Any], steps: int, key: str, stage: int, **hooks) -> None:
        torch.manual_seed(self.settings.seed * 1000 + stage)
        rehearsal = hooks.pop("rehearsal", None)
        draw = batch_drawer(examples, self.settings, self.harness.collate, key, rehearsal)
        fit(self.model, draw, steps, self.harness.loss, make_optimizer(self.model, self.settings), **hooks)

    def _scores(self, stage: int) -> list[float]:
        self.model.eval()
        scores = self.harness.evaluate(self.model, stage)
        missing = [task.name for task in self.tasks if task.name not in scores]
        if missing:
            raise MergelabError(f"the evaluator returned no score for task '{missing[0]}' (it returned "
                             f"{sorted(scores)}); it must score every task of the stream")
        return [float(scores[task.name]) for task in self.tasks]

    def _stage_key(self, stage: int) -> str:
        return f"stage{stage}:{self.tasks[stage].name}"

    def _expert(self, stage: int) -> dict[str, torch.Tensor]:
        """The starting model fine-tuned on task ``stage`` alone (cached); the one for task 0 is
        the shared first stage, the others are the post-hoc baselines' per-task models."""
        if stage not in self._experts:
            restore(self.model, self.base)
            self._train(self.tasks[stage].train, self.settings.steps_for(stage), self._stage_key(stage), stage)
            self._experts[stage] = snapshot(self.model)
            self.log(f"  per-task model for '{self.tasks[stage].name}' trained")
        return self._experts[stage]

    def initial(self) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Stage 0, shared by every method: plain fine-tuning on the first task."""
        if self._initial is None:
            state = self._expert(0)
            restore(self.model, state)
            self._initial = (state, self._scores(0))
        return self._initial

    def run(self, method: Method) -> dict[str, Any]:
        """Every stage of one method; returns its results (JSON-ready)."""
        method.check()
        state0, row0 = self.initial()  # shared, so not in this method's seconds
        started = time.perf_counter()
        states, rows = [state0], [row0]
        diverged = None
        for stage in range(1, len(self.tasks)):
            if method.name in POSTHOC_METHODS:
                self._merge_stage(method, stage)
            elif method.name == "multitask":
                restore(self.model, self.base)
                steps = sum(self.settings.steps_for(i) for i in range(stage + 1))
                self._train(union(t.train for t in self.tasks[:stage + 1]), steps, f"multitask{stage}", stage)
            else:
                restore(self.model, states[-1])
                self._continual_stage(method, stage, states[-1])
            rows.append(self._scores(stage))
            states.append(snapshot(self.model))
            if diverged is None and not all(bool(torch.isfinite(t).all()) for t in states[-1].values()
                                            if t.dtype.is_floating_point):
                diverged = self.tasks[stage].name
                self.log(f"  {method.title}: training diverged on task '{diverged}' (non-finite weights); "
                         f"lower the learning rate or lambda")
            self.log(f"  {method.title}: stage {stage + 1}/{len(self.tasks)} "
                     + " ".join(f"{t.name}={s:.3f}" for t, s in zip(self.tasks, rows[-1])))
        distances = [[l2_distance(states[i], states[j]) for j in range(i)] for i in range(len(states))]
        return {"label": method.title, "method": method.to_dict(), **continual_summary(rows),
                "l2_distance": distances, "diverged": diverged, "seconds": time.perf_counter() - started}

    def _continual_stage(self, method: Method, stage: int, anchor: dict[str, torch.Tensor]) -> None:
        task, steps, key = self.tasks[stage], self.settings.steps_for(stage), self._stage_key(stage)
        if method.name == "sequential":
            self._train(task.train, steps, key, stage)
        elif method.name == "sfa":
            sfa = SFA(anchor, steps, method.p, method.beta, model=self.model)
            self._train(task.train, steps, key, stage, after_step=sfa.maybe_average)
        elif method.name == "l2":
            self._train(task.train, steps, key, stage, penalty=L2Penalty(self.model, anchor, method.lam))
        elif method.name == "ewc":
            fisher = self._fisher(method, stage)
            self._train(task.train, steps, key, stage, penalty=EWCPenalty(self.model, anchor, fisher, method.lam))
        elif method.name == "rehearsal":
            old = union(t.train for t in self.tasks[:stage])
            buffer = Rehearsal(old, method.fraction, method.buffer_size, seed=self.settings.seed)
            self._train(task.train, steps, key, stage, rehearsal=buffer)

    def _fisher(self, method: Method, stage: int) -> dict[str, torch.Tensor]:
        """Σ over finished tasks of the Fisher at the model right after each (online EWC, γ = 1);
        the model holds the weights after task ``stage − 1``."""
        fisher = empirical_fisher(self.model, self.tasks[stage - 1].train, self.harness.loss, self.harness.collate,
                                  method.fisher_samples, seed=self.settings.seed + stage)
        if stage > 1:
            fisher = {name: self._fisher_sum[name] + value for name, value in fisher.items()}
        self._fisher_sum = fisher
        return fisher

    def _merge_stage(self, method: Method, stage: int) -> None:
        with tempfile.TemporaryDirectory(prefix="mergelab-posthoc-", dir=self.workdir) as tmp:
            root = Path(tmp)
            base_dir = save_checkpoint(self.base, root / "base")
            expert_dirs = [save_checkpoint(self._expert(i), root / f"task{i}") for i in range(stage + 1)]
            merged = merge_task_models(method.name, base_dir, expert_dirs, root / "merged", method.merge_parameters)
            load_checkpoint(self.model, merged)


def run_stream(model: torch.nn.Module, tasks: Sequence[Task], methods: Sequence[Method] | Method,
               settings: TrainSettings, harness: Harness, log: Callable[[str], None] | None = None,
               workdir: str | Path | None = None) -> dict[str, Any]:
    """Train ``model`` on ``tasks`` in order with each method and evaluate after every stage.

    Args:
        model: the starting model (restored between methods; left holding the last method's
            final weights).
        tasks: the stream, in order.
        methods: one ``Method`` or several (they share the first stage).
        settings: steps, batch size, optimizer, seed.
        harness: loss, batching and the evaluator.

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
    for method in methods:
        method.check()
    runner = StreamRunner(model, tasks, settings, harness, log, workdir)
    runs = [runner.run(method) for method in methods]
    _, initial_scores = runner.initial()
    names = [task.name for task in runner.tasks]
    return {"tasks": names, "initial": dict(zip(names, initial_scores)), "runs": runs}
