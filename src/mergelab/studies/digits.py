"""The split-digits experiment (the paper's Figure 1, on data that ships with scikit-learn).

``sklearn.datasets.load_digits`` (1,797 8×8 images) split by label: task A = the even digits,
task B = the odd digits. A small MLP learns A, then B, in two scenarios:

* ``class`` (class-incremental): one 10-way head; at test time the model must name the digit
  among all ten, so forgetting is not hidden by a per-task head;
* ``domain`` (domain-incremental): 5 outputs, target = digit // 2, shared by both tasks.

SFA (a p sweep at β = 0.5 and β sweeps at p = 0.25 and p = 1) is compared with L2 and EWC λ
sweeps, sequential fine-tuning, rehearsal, multitask training and post-hoc Task Arithmetic /
TIES, all through ``run_stream``; every number is the mean over seeds. The paper (Fig. 1) used
split MNIST; the MLP, optimizer and grids here are ours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from mergelab.continual import Harness, Method, StreamTask, TrainSettings, run_stream
from mergelab.errors import MergelabError
from mergelab.parallel import WorkerPool, check_workers, worker_pool

SCENARIOS = {"class": 10, "domain": 5}  # number of outputs


@dataclass
class DigitsConfig:
    """The experiment's grid (defaults: the numbers in the README and the closing note)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    scenario: str = "class"
    hidden: int = 128
    settings: TrainSettings = field(default_factory=lambda: TrainSettings(
        steps=400, batch_size=32, lr=0.05, optimizer="sgd", momentum=0.9))
    sfa_p: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    sfa_beta: tuple[float, ...] = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
    sfa_beta_at_p: tuple[float, ...] = (0.25, 1.0)  # p = 1: average once, at the end (the paper's Fig. 6)
    l2_lambda: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    ewc_lambda: tuple[float, ...] = (1e2, 1e3, 1e4, 3e4, 1e5)  # from 3e5 on, SGD diverges on some seeds
    rehearsal_fraction: float = 0.1
    ties_parameters: dict[str, Any] = field(default_factory=lambda: {"density": 0.5})
    test_size: float = 0.3

    def methods(self) -> list[Method]:
        methods = [Method("sequential"), Method("multitask"), Method("rehearsal", fraction=self.rehearsal_fraction)]
        methods += [Method("sfa", p=p, beta=0.5) for p in self.sfa_p]
        methods += [Method("sfa", p=p, beta=b) for p in self.sfa_beta_at_p for b in self.sfa_beta
                    if not (b == 0.5 and p in self.sfa_p)]
        methods += [Method("l2", lam=lam) for lam in self.l2_lambda]
        methods += [Method("ewc", lam=lam) for lam in self.ewc_lambda]
        methods += [Method("task_arithmetic"), Method("ties", merge_parameters=dict(self.ties_parameters))]
        return methods


class MLP(torch.nn.Module):
    def __init__(self, hidden: int = 128, inputs: int = 64, classes: int = 10):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (batch, 64) -> (batch, 10)
        return self.layers(pixels)


def split_digits(seed: int = 0, test_size: float = 0.3, scenario: str = "class"
                 ) -> tuple[torch.Tensor, torch.Tensor, list[StreamTask]]:
    """(pixels, targets, [task A, task B]); a task's examples are row indices into pixels/targets.

    ``scenario="class"``: the target is the digit (10 classes, one head for both tasks);
    ``"domain"``: the target is digit // 2 (5 classes: "which of my five digits"), so both
    tasks share the same outputs.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64) in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    if scenario not in SCENARIOS:
        raise MergelabError(f"split-digits scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    train_rows, test_rows = train_test_split(list(range(len(labels))), test_size=test_size, random_state=seed,
                                             stratify=digits.target)
    tasks = []
    for name, parity in (("A (even)", 0), ("B (odd)", 1)):
        tasks.append(StreamTask(name, [i for i in train_rows if labels[i] % 2 == parity],
                          [i for i in test_rows if labels[i] % 2 == parity]))
    return pixels, (labels // 2 if scenario == "domain" else labels), tasks


def digits_harness(pixels: torch.Tensor, labels: torch.Tensor, tasks: list[StreamTask]) -> Harness:
    def collate(rows: list[int]):
        index = torch.tensor(rows)
        return pixels[index], labels[index]

    def loss(model, batch):
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    @torch.no_grad()
    def evaluate(model, stage):
        scores = {}
        for task in tasks:
            inputs, targets = collate(list(task.eval))
            scores[task.name] = float((model(inputs).argmax(-1) == targets).float().mean())
        return scores

    return Harness(loss=loss, collate=collate, evaluate=evaluate)


def run_split_digits(config: DigitsConfig | None = None, log: Callable[[str], None] | None = None,
                     workdir: Path | None = None, workers: int | WorkerPool | None = 1) -> dict[str, Any]:
    """Run every method of ``config`` for every seed (one seed per unit of work, in ``workers``
    processes); returns per-seed runs and their means."""
    config = config or DigitsConfig()
    started = time.perf_counter()
    with worker_pool(workers) as pool:
        return collect_seeds(config, pool.imap(run_seed, [(config, seed, log is not None, workdir)
                                                          for seed in config.seeds]), time.perf_counter() - started)


def run_seed(config: DigitsConfig, seed: int, verbose: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    """Every method of ``config`` on one seed's split (a unit of work; ``verbose`` prints progress)."""
    log = print if verbose else (lambda _: None)
    pixels, labels, tasks = split_digits(seed, config.test_size, config.scenario)
    torch.manual_seed(seed)
    model = MLP(config.hidden, classes=SCENARIOS[config.scenario])
    settings = TrainSettings(**{**config.settings.__dict__, "seed": seed})
    log(f"seed {seed}: {len(tasks[0].train)}/{len(tasks[1].train)} training images in tasks A/B")
    return run_stream(model, tasks, config.methods(), settings, digits_harness(pixels, labels, tasks),
                      log=log, workdir=workdir)


def collect_seeds(config: DigitsConfig, per_seed: Iterable[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One scenario's result from its per-seed runs (in seed order); ``seconds``: the time it took."""
    per_seed = list(per_seed)
    return {"experiment": "split-digits", "seeds": list(config.seeds), "tasks": per_seed[0]["tasks"],
            "config": _describe(config), "initial": _mean_dicts([r["initial"] for r in per_seed]),
            "runs": _mean_runs(per_seed), "per_seed": per_seed, "seconds": seconds}


def _describe(config: DigitsConfig) -> dict[str, Any]:
    described = {k: v for k, v in config.__dict__.items() if k != "settings"}
    described["settings"] = dict(config.settings.__dict__)
    described["model"] = f"MLP 64-{config.hidden}-{config.hidden}-10 (ReLU), one shared 10-way head"
    return described


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(d[key] for d in dicts) / len(dicts) for key in dicts[0]}


def _mean_runs(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Element-wise means over seeds of every number of every run (runs align by position)."""
    import statistics

    def mean(values):
        if isinstance(values[0], list):
            return [mean([v[i] for v in values]) for i in range(len(values[0]))]
        if isinstance(values[0], (int, float)):
            return sum(values) / len(values)
        return values[0]

    merged = []
    for runs in zip(*(result["runs"] for result in per_seed)):
        run = {key: mean([r[key] for r in runs]) for key in runs[0]}
        run["diverged"] = next((r["diverged"] for r in runs if r["diverged"]), None)
        finals = [r["accuracy_matrix"][-1] for r in runs]
        run["final_std"] = [statistics.pstdev([f[i] for f in finals]) for i in range(len(finals[0]))]
        merged.append(run)
    return merged


def compare_families(result: dict[str, Any]) -> dict[str, Any]:
    """Per family (SFA, L2, EWC, and every single baseline): the run with the best final mean
    accuracy over the two tasks, and how many L2/EWC points some SFA point dominates (at least
    as good on both tasks)."""
    families: dict[str, list[dict]] = {}
    for run in result["runs"]:
        if not run["diverged"]:
            families.setdefault(run["method"]["name"], []).append(run)
    best = {name: max(runs, key=lambda r: r["average_accuracy"]) for name, runs in families.items()}
    summary = {name: {"label": run["label"], "average_accuracy": run["average_accuracy"],
                      "final": run["accuracy_matrix"][-1]} for name, run in best.items()}
    sfa_points = [r["accuracy_matrix"][-1] for r in families.get("sfa", [])]
    dominated = {}
    for name in ("l2", "ewc"):
        points = [r["accuracy_matrix"][-1] for r in families.get(name, [])]
        dominated[name] = sum(any(all(s >= q for s, q in zip(sfa, point)) for sfa in sfa_points) for point in points)
        dominated[f"{name}_points"] = len(points)
    default = next((r["average_accuracy"] for r in families.get("sfa", [])
                    if r["method"]["p"] == 0.25 and r["method"]["beta"] == 0.5), None)
    return {"best": summary, "dominated_by_sfa": dominated, "sfa_default": default,
            "settings": {name: len(runs) for name, runs in families.items()}}


def digits_verdict(comparison: dict[str, Any]) -> str:
    """One honest sentence per penalty baseline: best against best (with how many settings each
    family had, since more settings mean more chances), SFA at the paper's default, and how many
    of the baseline's settings some SFA setting dominates."""
    best, counts = comparison["best"], comparison["dominated_by_sfa"]
    if "sfa" not in best:
        return "no SFA runs"
    sfa = best["sfa"]["average_accuracy"]
    default = comparison.get("sfa_default")
    parts = []
    for name in ("l2", "ewc"):
        if name not in best:
            continue
        other = best[name]["average_accuracy"]
        word = "beats" if sfa > other + 0.005 else ("ties with" if abs(sfa - other) <= 0.005 else "loses to")
        parts.append(f"SFA's best of {comparison['settings']['sfa']} settings ({best['sfa']['label']}, mean "
                     f"{sfa:.3f}) {word} {name.upper()}'s best of {comparison['settings'][name]} "
                     f"({best[name]['label']}, mean {other:.3f}); {counts[name]} of {counts[name + '_points']} "
                     f"{name.upper()} settings are dominated by an SFA setting")
    if default is not None:
        parts.append(f"SFA at the paper's default p=0.25, β=0.5 has mean {default:.3f}")
    return "; ".join(parts)


def run_digits_experiment(out_dir: str | Path, force: bool = False, quiet: bool = False,
                          scenarios: tuple[str, ...] = ("class", "domain"), workers: int | WorkerPool | None = None,
                          **config: Any) -> Path:
    """Run the split-digits experiment for each scenario and write ``results.json``,
    ``results.md`` and ``split_digits_<scenario>.png`` into ``out_dir`` (all or nothing).

    Every (scenario, seed) is a unit of work, run in ``workers`` processes (None: the usable
    cores; 1: in this process) on one torch thread each (a tiny MLP: more threads only add
    overhead, and stall on a busy machine); the numbers are the same for any ``workers``.

    Example:
        >>> run_digits_experiment("sfa-digits")  # doctest: +SKIP
    """
    from mergelab.io import check_output_dir

    check_output_dir(out_dir, force)  # fail before the work, not after
    if not isinstance(workers, WorkerPool):
        workers = check_workers(workers)
    started = time.perf_counter()
    configs = digits_configs(scenarios, **config)
    with worker_pool(workers) as pool:
        runs = list(pool.imap(run_seed, [(*unit, not quiet) for unit in digits_units(configs)]))
    return write_digits_experiment(out_dir, configs, runs, time.perf_counter() - started, force, quiet)


def digits_configs(scenarios: tuple[str, ...] = ("class", "domain"), **config: Any) -> dict[str, DigitsConfig]:
    """One ``DigitsConfig`` per scenario (``config``: its fields, e.g. ``seeds``)."""
    return {scenario: DigitsConfig(scenario=scenario, **config) for scenario in scenarios}


def digits_units(configs: dict[str, DigitsConfig]) -> list[tuple[DigitsConfig, int]]:
    """The experiment's units of work, ``(config, seed)`` for ``run_seed``, scenario by scenario: a
    caller with its own worker pool (the demo) submits them beside its other work."""
    return [(config, seed) for config in configs.values() for seed in config.seeds]


def write_digits_experiment(out_dir: str | Path, configs: dict[str, DigitsConfig], runs: list[dict[str, Any]],
                            seconds: float, force: bool = False, quiet: bool = False) -> Path:
    """Collect ``run_seed``'s results (in ``digits_units``'s order) per scenario and write
    ``results.json``, ``results.md`` and the figures into ``out_dir`` (all or nothing)."""
    from mergelab.continual.report import save_plane_figure, stream_table, write_json, write_outputs

    log = (lambda _: None) if quiet else print
    runs = iter(runs)
    results = {}
    for scenario, scenario_config in configs.items():
        log(f"split digits, {scenario}-incremental")
        results[scenario] = collect_seeds(scenario_config, [next(runs) for _ in scenario_config.seeds], seconds)
        results[scenario]["comparison"] = compare_families(results[scenario])
    scenarios = list(configs)
    lines = ["# Split digits (sklearn load_digits; task A = even, task B = odd digits)\n",
             f"{seconds:.0f} s in all. Scores: test accuracy, mean over seeds {list(results[scenarios[0]]['seeds'])}"
             f" (± population std of the final score).\n"]
    writers = {}
    for scenario, result in results.items():
        lines += [f"\n## {scenario}-incremental ({_SCENARIO_TEXT[scenario]})\n", stream_table(result),
                  f"\n**Verdict:** {digits_verdict(result['comparison'])}.\n"]
        panels = [("beta", "SFA: β sweep (p fixed)"), ("p", "SFA: p sweep (β fixed)")]
        writers[f"split_digits_{scenario}.png"] = (lambda path, r=result, s=scenario: save_plane_figure(
            path, r, panels, f"split digits, {s}-incremental: task A (even) vs task B (odd)"))
    writers["results.json"] = write_json({"experiment": "split-digits", "seconds": seconds, "scenarios": results})
    writers["results.md"] = lambda path: path.write_text("".join(lines))
    write_outputs(out_dir, writers, force)
    for scenario, result in results.items():
        log(f"{scenario}-incremental: {digits_verdict(result['comparison'])}")
    log(f"split digits done in {seconds:.0f} s; results in {out_dir}")
    return Path(out_dir)


_SCENARIO_TEXT = {"class": "one 10-way head; the model must name the digit among all ten",
                  "domain": "5 outputs, target = digit // 2, shared by both tasks"}
