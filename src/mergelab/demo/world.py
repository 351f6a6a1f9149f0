"""The demo world: twelve generated tasks, a base model, one expert per held-in task and a
multitask model, all ordinary Hugging Face model directories, built once and cached.

The base is trained on a general mixture (the held-out skills) that excludes the held-in
tasks; each expert is the base fine-tuned on one held-in task; the multitask model is the
base fine-tuned on all of them. ``world.json`` records every model's test score on every
task, which is where the forgetting shows: experts gain their task and lose held-out skills.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from mergelab.config import read_records
from mergelab.demo.tasks import VOCABULARY, WORLD_TASKS, as_training_pair, make_split
from mergelab.demo.tiny import save
from mergelab.lm import build_tokenizer, tiny_llama, train
from mergelab.devices import torch_threads

WORLD_VERSION = 1  # bump when tasks or training change, so stale caches are not reused


@dataclass(frozen=True)
class WorldSettings:
    """Everything the world depends on; its hash names the cache directory."""

    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    train_examples: int = 2000
    validation_examples: int = 100
    test_examples: int = 200
    batch_size: int = 64
    base_steps: int = 600
    base_lr: float = 3e-3
    expert_steps: int = 250
    expert_lr: float = 2e-3
    multitask_steps: int = 600

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "version": WORLD_VERSION,
                              "tasks": [(t.name, t.split, t.kind) for t in WORLD_TASKS]}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


@dataclass
class World:
    """A built world: where its models and tasks are, and how every model scores."""

    root: Path
    settings: WorldSettings
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model name -> task -> score
    build_seconds: float = 0.0

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    @property
    def multitask(self) -> Path:
        return self.root / "models" / "multitask"

    @property
    def experts(self) -> dict[str, Path]:
        return {t.name: self.root / "models" / f"expert-{t.name}" for t in WORLD_TASKS if t.split == "held_in"}

    def data_file(self, task: str, split: str) -> Path:
        return self.root / "data" / task / f"{split}.jsonl"

    def pairs(self, task: str, split: str, count: int | None = None) -> list[dict[str, str]]:
        """(input, output) pairs of one task's split, as a model is trained on them."""
        rows = read_records(self.data_file(task, split))
        return [as_training_pair(row) for row in rows[:count]]

    def tasks_file(self, split: str = "test") -> Path:
        return self.root / f"tasks-{split}.yml"

    def tasks(self, split: str = "test"):
        from mergelab.evaluate import load_tasks

        return load_tasks(self.tasks_file(split))


def default_cache() -> Path:
    return Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))


def build_world(settings: WorldSettings = WorldSettings(), cache: str | Path | None = None,
                log: Callable[[str], None] = print, force: bool = False) -> World:
    """Build the world (or reuse the cached one with the same settings)."""
    root = Path(cache or default_cache()) / f"world-{settings.key()}"
    manifest = root / "world.json"
    if manifest.is_file() and not force:
        data = json.loads(manifest.read_text())
        log(f"  reusing the demo world in {root}")
        return World(root, settings, data["scores"], data["build_seconds"])
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        world = World(tmp, settings)
        _write_tasks(world)
        with torch_threads(1):
            _train_models(world, log)
            log("  scoring every model on every task")
            world.scores = score_matrix(world)
        world.build_seconds = time.perf_counter() - started
        (tmp / "world.json").write_text(json.dumps({"settings": asdict(settings), "scores": world.scores,
                                                    "build_seconds": world.build_seconds}, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.root = root
    log(f"  world built in {world.build_seconds:.0f} s: {root}")
    return world


def _write_tasks(world: World) -> None:
    settings = world.settings
    counts = {"train": settings.train_examples, "validation": settings.validation_examples,
              "test": settings.test_examples}
    for task in WORLD_TASKS:
        for split, count in counts.items():
            path = world.data_file(task.name, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in make_split(task, split, count, settings.seed)))
    for split in ("validation", "test"):
        tasks = [{"name": t.name, "category": t.category, "split": t.split, "kind": t.kind, "metric": t.metric,
                  "data": f"data/{t.name}/{split}.jsonl", "options": {"max_new_tokens": 8}} for t in WORLD_TASKS]
        world.tasks_file(split).write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))


def training_pairs(world: World, names: list[str]) -> list[dict[str, str]]:
    return [pair for name in names for pair in world.pairs(name, "train")]


def _train_models(world: World, log: Callable[[str], None]) -> None:
    settings = world.settings
    tokenizer = build_tokenizer(VOCABULARY)
    held_in = [t.name for t in WORLD_TASKS if t.split == "held_in"]
    general = [t.name for t in WORLD_TASKS if t.split != "held_in"]
    base = tiny_llama(vocab_size=len(VOCABULARY), hidden=settings.hidden, layers=settings.layers,
                      heads=settings.heads, intermediate=settings.intermediate, tie=True, seed=settings.seed)
    tick = time.perf_counter()
    train(base, tokenizer, training_pairs(world, general), settings.base_steps, lr=settings.base_lr,
          batch_size=settings.batch_size, seed=settings.seed)
    save(base, tokenizer, world.base)
    log(f"  base: {settings.base_steps} steps on the general mixture ({', '.join(general)}), "
        f"{time.perf_counter() - tick:.0f} s")
    for index, (name, path) in enumerate(world.experts.items()):
        tick = time.perf_counter()
        expert = copy.deepcopy(base)
        train(expert, tokenizer, training_pairs(world, [name]), settings.expert_steps, lr=settings.expert_lr,
              batch_size=settings.batch_size, seed=settings.seed + 1 + index)
        save(expert, tokenizer, path)
        log(f"  expert '{name}': {settings.expert_steps} steps, {time.perf_counter() - tick:.0f} s")
    tick = time.perf_counter()
    multitask = copy.deepcopy(base)
    train(multitask, tokenizer, training_pairs(world, held_in), settings.multitask_steps, lr=settings.expert_lr,
          batch_size=settings.batch_size, seed=settings.seed + 100)
    save(multitask, tokenizer, world.multitask)
    log(f"  multitask: {settings.multitask_steps} steps on all held-in tasks, {time.perf_counter() - tick:.0f} s")


def score_matrix(world: World) -> dict[str, dict[str, float]]:
    """Every model's test score on every task."""
    from mergelab.evaluate import evaluate_models

    models = {"base": world.base, **{f"expert-{k}": v for k, v in world.experts.items()},
              "multitask": world.multitask}
    rows = evaluate_models(list(models.values()), world.tasks("test"), progress=False, batch_size=64)
    names = {str(path): name for name, path in models.items()}
    scores: dict[str, dict[str, float]] = {}
    for row in rows:
        scores.setdefault(names[row["model"]], {})[row["task"]] = row["score"]
    return scores


def forgetting_table(world: World) -> str:
    """Markdown: each model's score on each task (experts gain their task, lose others)."""
    names = [t.name for t in WORLD_TASKS]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, scores in world.scores.items():
        lines.append(f"| {model} | " + " | ".join(f"{scores[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)
