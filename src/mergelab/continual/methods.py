"""The registry of continual-learning methods, as ``mergelab.methods.METHODS`` is for merges.

One ``ContinualMethod`` entry per method says everything the rest of the package needs: its
hyperparameters (default, check, help, which ones a spec list sweeps), what it does at the
start of each task after the first (``start``: how that stage trains, with any per-step
penalty or averaging hook) and at its end (``end``), its paper, its title in tables, and its
style in the task-plane plots. The spec parser, the stream runner and the report read only
these entries, never a method's name, so a new method is one entry in ``CONTINUAL_METHODS``.

Example:
    >>> from mergelab.continual.methods import CONTINUAL_METHODS
    >>> sorted(CONTINUAL_METHODS)  # doctest: +NORMALIZE_WHITESPACE
    ['ewc', 'l2', 'multitask', 'rehearsal', 'sequential', 'sfa', 'task_arithmetic', 'ties']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from mergelab.continual.baselines import EWCPenalty, L2Penalty, Rehearsal, check_fraction, check_strength, union
from mergelab.continual.posthoc import load_checkpoint, merge_task_models, save_checkpoint
from mergelab.continual.sfa import SFA, check_beta, check_p
from mergelab.errors import MergelabError

if TYPE_CHECKING:
    from mergelab.continual.stream import StreamRunner


# -- hyperparameters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HyperParam:
    """One hyperparameter of a continual method."""

    name: str  # the ``Method`` attribute and the key in results
    default: Any
    check: Callable[[Any], Any]  # returns the value, or raises MergelabError
    help: str
    key: str | None = None  # the spec's key when it differs from ``name`` (``lambda``)
    sweep: bool = False  # a list in a spec sweeps it: one run per value
    symbol: str | None = None  # in titles and plot labels

    @property
    def spec_key(self) -> str:
        return self.key or self.name

    @property
    def label(self) -> str:
        return self.symbol or self.spec_key


def _optional_count(what: str) -> Callable[[Any], int | None]:
    def check(value):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MergelabError(f"{what} must be a whole number of at least 1 (or left out), got {value!r}")
        return value
    return check


def _merge_parameters(value) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MergelabError(f"merge parameters must be a mapping like {{density: 0.5}}, got {value!r}")
    return dict(value)


P = HyperParam("p", 0.25, check_p, "fraction of the task's steps between averagings, in (0, 1]; 1 averages once, "
               "at the end", sweep=True)
BETA = HyperParam("beta", 0.5, check_beta, "weight on the previous task's checkpoint, in [0, 1]", sweep=True,
                  symbol="β")
MERGE_PARAMETERS = HyperParam("merge_parameters", {}, _merge_parameters,
                              "parameters of the merge method (e.g. lambda, density)", key="parameters")


def _strength(what: str) -> HyperParam:
    return HyperParam("lam", 1.0, lambda lam: check_strength(lam, what), f"{what} strength λ, ≥ 0", key="lambda",
                      sweep=True, symbol="λ")


# -- what a method does in a stage -------------------------------------------------------------
@dataclass
class Stage:
    """What a method sees at task ``index`` (≥ 1) of the stream. The model holds the weights
    after the previous task (``anchor``) when ``start`` is called."""

    runner: StreamRunner
    method: Method
    index: int
    anchor: dict[str, torch.Tensor]
    memory: dict[str, Any]  # kept across the stages of one run (e.g. EWC's running Fisher)

    @property
    def task(self):
        return self.runner.tasks[self.index]

    @property
    def steps(self) -> int:
        return self.runner.settings.steps_for(self.index)

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model


@dataclass
class Training:
    """How a stage trains: on which examples, for how many steps, from which weights, and what
    happens at every step (a penalty added to the loss, a hook after the optimizer step, old
    examples mixed into the batches)."""

    examples: Sequence[Any]
    steps: int
    key: str  # names the batch stream: equal keys draw equal batches in every method
    start_from: dict[str, torch.Tensor] | None = None  # None: go on from the previous task's weights
    penalty: Callable[[], torch.Tensor] | None = None
    after_step: Callable[[torch.nn.Module, int], Any] | None = None
    rehearsal: Rehearsal | None = None


def _plain(stage: Stage, **hooks) -> Training:
    return Training(stage.task.train, stage.steps, stage.runner.stage_key(stage.index), **hooks)


def _sequential(stage: Stage) -> Training:
    return _plain(stage)


def _sfa(stage: Stage) -> Training:
    sfa = SFA(stage.anchor, stage.steps, stage.method.p, stage.method.beta, model=stage.model)
    return _plain(stage, after_step=sfa.maybe_average)


def _l2(stage: Stage) -> Training:
    return _plain(stage, penalty=L2Penalty(stage.model, stage.anchor, stage.method.lam))


def _ewc(stage: Stage) -> Training:
    """Σ over finished tasks of the Fisher at the model right after each (online EWC, γ = 1)."""
    runner = stage.runner
    fisher = runner.fisher(runner.tasks[stage.index - 1].train, stage.method.fisher_samples,
                           seed=runner.settings.seed + stage.index)
    if "fisher" in stage.memory:
        fisher = {name: stage.memory["fisher"][name] + value for name, value in fisher.items()}
    stage.memory["fisher"] = fisher
    return _plain(stage, penalty=EWCPenalty(stage.model, stage.anchor, fisher, stage.method.lam))


def _rehearsal(stage: Stage) -> Training:
    old = union(task.train for task in stage.runner.tasks[:stage.index])
    buffer = Rehearsal(old, stage.method.fraction, stage.method.buffer_size, seed=stage.runner.settings.seed)
    return _plain(stage, rehearsal=buffer)


def _multitask(stage: Stage) -> Training:
    runner, seen = stage.runner, range(stage.index + 1)
    steps = round(stage.method.scale * sum(runner.settings.steps_for(i) for i in seen))
    return Training(union(runner.tasks[i].train for i in seen), max(1, steps), f"multitask{stage.index}",
                    start_from=runner.base)


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise MergelabError(f"multitask scale must be a finite number > 0 (its steps = scale × the tasks' steps), "
                            f"got {scale!r}")
    return float(scale)


def _no_training(stage: Stage) -> None:
    return None


def _merge_task_models(stage: Stage) -> None:
    """Merge the per-task models of tasks 0..index (each fine-tuned from the initial model on
    its task alone) with the merge core, and load the result."""
    import tempfile
    from pathlib import Path

    runner = stage.runner
    with tempfile.TemporaryDirectory(prefix="mergelab-posthoc-", dir=runner.workdir) as tmp:
        root = Path(tmp)
        base_dir = save_checkpoint(runner.base, root / "base")
        expert_dirs = [save_checkpoint(runner.expert(i), root / f"task{i}") for i in range(stage.index + 1)]
        merged = merge_task_models(stage.method.name, base_dir, expert_dirs, root / "merged",
                                   stage.method.merge_parameters)
        load_checkpoint(stage.model, merged)


# -- the registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContinualMethod:
    """A registered continual method.

    ``start(stage)`` runs at the start of every task after the first and returns how that
    stage trains (``Training``), or None for no training; ``end(stage)``, when given, runs after
    it. Plot style: ``marker`` for a single point; methods with sweep parameters are drawn as
    curves (``line``, then other line styles for a family's further curves). ``color`` None (the
    default) takes the method's colour in every mergelab figure (``mergelab.plots.method_color``).
    """

    name: str
    summary: str
    paper: str
    title: Callable[[dict[str, Any]], str]
    start: Callable[[Stage], Training | None] = _sequential
    end: Callable[[Stage], None] | None = None
    params: tuple[HyperParam, ...] = ()
    short: str = ""  # the family's name in plot legends
    marker: str = "o"
    color: str | None = None
    line: str = "-"

    def param(self, key: str) -> HyperParam | None:
        """The parameter with this attribute name or spec key."""
        return next((p for p in self.params if key in (p.name, p.spec_key)), None)

    @property
    def sweeps(self) -> tuple[HyperParam, ...]:
        return tuple(p for p in self.params if p.sweep)


CONTINUAL_METHODS: dict[str, ContinualMethod] = {method.name: method for method in (
    ContinualMethod("sequential", "plain fine-tuning on each new task", "the lower baseline",
                    title=lambda v: "sequential", marker="o"),
    ContinualMethod("sfa", "fine-tuning, pulled toward the previous task's weights every ⌈p·T⌉ steps",
                    "Soup to go (Algorithm 1)", start=_sfa, params=(P, BETA), short="SFA",
                    title=lambda v: f"SFA p={v['p']:g} β={v['beta']:g}"),
    ContinualMethod("l2", "fine-tuning plus λ/2·‖θ − θ_o‖²", "Soup to go §4 (L2 regularisation)", start=_l2,
                    params=(_strength("L2 penalty"),), short="L2", title=lambda v: f"L2 λ={v['lam']:g}",
                    line="--"),
    ContinualMethod("ewc", "fine-tuning plus λ/2·Σ F·(θ − θ_o)², F the summed Fisher of the finished tasks",
                    "Kirkpatrick et al. 2017 (EWC)", start=_ewc,
                    params=(_strength("EWC"), HyperParam("fisher_samples", 200, _optional_count("fisher_samples"),
                                                         "examples of the old task the Fisher is estimated on")),
                    short="EWC", title=lambda v: f"EWC λ={v['lam']:g}", line=":"),
    ContinualMethod("rehearsal", "fine-tuning on batches that mix in a fraction of the earlier tasks' data",
                    "experience replay", start=_rehearsal,
                    params=(HyperParam("fraction", 0.1, check_fraction, "share of each batch from old tasks, in "
                                       "(0, 1)"),
                            HyperParam("buffer_size", None, _optional_count("rehearsal buffer_size"),
                                       "keep only this many old examples (default all)")),
                    title=lambda v: f"rehearsal {v['fraction']:.0%}", marker="D"),
    ContinualMethod("multitask", "retrain from the initial model on every task so far (not continual)",
                    "the upper baseline", start=_multitask,
                    params=(HyperParam("scale", 1.0, _check_scale, "its steps are scale × the sum of the tasks' steps "
                                       "so far; raise it until the baseline converges (joint training of interfering "
                                       "tasks needs more steps than each task alone)"),),
                    title=lambda v: "multitask" if v["scale"] == 1 else f"multitask ×{v['scale']:g}", marker="*"),
    ContinualMethod("task_arithmetic", "merge per-task models: θ_b + λ·Σ τ_i (λ = 1/N by default)",
                    "Ilharco et al. 2023", start=_no_training, end=_merge_task_models, params=(MERGE_PARAMETERS,),
                    title=lambda v: "task arithmetic", marker="s"),
    ContinualMethod("ties", "merge per-task models with TIES", "Yadav et al. 2023", start=_no_training,
                    end=_merge_task_models, params=(MERGE_PARAMETERS,), title=lambda v: "TIES", marker="^"),
)}


def continual_method(name: str) -> ContinualMethod:
    if name not in CONTINUAL_METHODS:
        raise MergelabError(f"unknown continual method '{name}'; choose one of: {', '.join(CONTINUAL_METHODS)}")
    return CONTINUAL_METHODS[name]


def unused_parameter(method: str, key: str) -> MergelabError:
    owners = [m.name for m in CONTINUAL_METHODS.values() if m.param(key) is not None]
    where = f"only {' and '.join(owners)} do" if owners else "no continual method does"
    return MergelabError(f"method '{method}' does not use {key} ({where}); remove it or change the method")


class Method:
    """A continual method and its hyperparameters, checked against the registry.

    Example:
        >>> Method("sfa", p=0.5).title
        'SFA p=0.5 β=0.5'
    """

    def __init__(self, name: str, label: str | None = None, **values: Any):
        entry = continual_method(name)
        for key in values:
            if entry.param(key) is None:
                raise unused_parameter(name, key)
        self.name, self.label, self.entry = name, label, entry
        self.values = {p.name: p.check(values[p.name] if p.name in values else values.get(p.spec_key, p.default))
                       for p in entry.params}

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"continual method '{self.__dict__.get('name')}' has no parameter '{name}'")

    def __repr__(self) -> str:
        return f"Method({self.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.values.items()) + ")"

    def __eq__(self, other) -> bool:
        return isinstance(other, Method) and (self.name, self.label, self.values) == (other.name, other.label,
                                                                                     other.values)

    def check(self) -> "Method":
        """Kept for callers that check explicitly: a Method is checked when it is built."""
        return self

    @property
    def title(self) -> str:
        return self.label or self.entry.title(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.values}
