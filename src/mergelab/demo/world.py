"""The demo world: twelve generated tasks, a base model, one expert per held-in task and a
multitask model, all ordinary Hugging Face model directories, built once and cached.

The base is trained on a general mixture (the held-out skills) that excludes the held-in
tasks; each expert is the base fine-tuned on one held-in task; the multitask model is the
base fine-tuned on all of them. ``world.json`` records every model's test score on every
task, which is where the forgetting shows: experts gain their task and lose held-out skills.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import yaml

from mergelab.config import read_records
from mergelab.demo.tasks import INSTRUCTION_TASKS, VOCABULARY, WORLD_TASKS, as_training_pair, make_split
from mergelab.demo.tiny import save
from mergelab.errors import MergelabError
from mergelab.lm import build_tokenizer, tiny_llama, train
from mergelab.outdir import atomic_directory
from mergelab.parallel import WorkerPool, worker_pool

WORLD_VERSION = 1  # bump when tasks or training change, so stale caches are not reused
# Rows per forward pass when a world model is scored: a whole task (200 examples, 2-4 options) in
# one or a few batches. Fewer, larger passes cost the tiny models less; the predictions are those
# of batch 64 (checked on every model of the demo world and on merges of it, benchmarks/README.md).
EVAL_BATCH = 256

# The scale study's model sizes (docs/scale-study.md): hidden, layers, heads, intermediate. `medium`
# is the demo world's model; `tiny` and `mini` are for the quick (smoke) study only.
SIZES = {
    "tiny": dict(hidden=16, layers=1, heads=2, intermediate=32),
    "mini": dict(hidden=32, layers=2, heads=2, intermediate=64),
    "small": dict(hidden=64, layers=2, heads=4, intermediate=128),
    "medium": dict(hidden=128, layers=4, heads=4, intermediate=256),
    "large": dict(hidden=256, layers=6, heads=8, intermediate=512),
}
# plain: the demo's base; instruction: further trained on INSTRUCTION_TASKS (the FLAN analogue);
# pretrained: pretrained with a share of each held-in skill, experts are light fine-tunes.
BASE_KINDS = ("plain", "instruction", "pretrained")


@dataclass(frozen=True)
class WorldSettings:
    """Everything the world depends on; its hash names the cache directory.

    ``size`` (a key of ``SIZES``) sets hidden, layers, heads and intermediate; ``base_kind`` (one
    of ``BASE_KINDS``) picks the world family of docs/scale-study.md. The fields after
    ``multitask_steps`` stay out of the cache key at their defaults, so the demo world's key
    (and cache) is the same as before they existed.
    """

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
    size: str | None = None
    base_kind: str = "plain"
    instruction_steps: int = 300  # instruction: extra base steps on instructions + the general mixture
    pretrain_share: float = 0.1  # pretrained: share of each held-in task's training examples in pretraining
    light_expert_steps: int = 80  # pretrained: the experts' light fine-tune (the multitask model: 8× the steps)
    light_expert_lr: float = 5e-4

    def __post_init__(self) -> None:
        if self.base_kind not in BASE_KINDS:
            raise MergelabError(f"base_kind '{self.base_kind}' is not known; use one of {', '.join(BASE_KINDS)}")
        if not 0 <= self.pretrain_share <= 1:
            raise MergelabError(f"pretrain_share must be between 0 and 1; got {self.pretrain_share}")
        if self.size is None:
            return
        if self.size not in SIZES:
            raise MergelabError(f"size '{self.size}' is not known; use one of {', '.join(SIZES)}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in SIZES[self.size].items():
            if getattr(self, name) not in (defaults[name], value):
                raise MergelabError(f"size '{self.size}' sets {name}={value}; drop {name}={getattr(self, name)} "
                                    f"or the size")
            object.__setattr__(self, name, value)

    @property
    def name(self) -> str:
        """A readable name for titles and tables: ``<size> <base_kind>`` (size: hidden×layers if none)."""
        return f"{self.size or f'h{self.hidden}x{self.layers}'} {self.base_kind}"

    @property
    def expert_schedule(self) -> tuple[int, float, int]:
        """(expert steps, expert and multitask learning rate, multitask steps) of this family."""
        if self.base_kind == "pretrained":
            return self.light_expert_steps, self.light_expert_lr, 8 * self.light_expert_steps
        return self.expert_steps, self.expert_lr, self.multitask_steps

    def key(self) -> str:
        defaults = {f.name: f.default for f in fields(self)}
        settings = {name: value for name, value in asdict(self).items()
                    if name not in _FAMILY_FIELDS or value != defaults[name]}
        settings.pop("size", None)  # the architecture fields it sets are in the key
        payload = json.dumps({**settings, "version": WORLD_VERSION,
                              "tasks": [(t.name, t.split, t.kind) for t in WORLD_TASKS]}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


_FAMILY_FIELDS = ("size", "base_kind", "instruction_steps", "pretrain_share", "light_expert_steps",
                  "light_expert_lr")


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
                log: Callable[[str], None] = print, force: bool = False,
                workers: int | WorkerPool | None = None) -> World:
    """Build the world (or reuse the cached one with the same settings).

    The experts and the multitask model are trained from the base in ``workers`` processes
    (None: the usable cores; or a shared ``WorkerPool``), one torch thread each, with the seeds
    of the sequential build, so the world is the same for any number of workers. One process
    builds a cache entry at a time (a lock beside it); the others wait and reuse it. The entry
    is published whole (``atomic_directory``) or not at all.
    """
    root = Path(cache or default_cache()) / f"world-{settings.key()}"
    if not force and (cached := _cached(root, settings, log)):
        return cached
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, log):
        if not force and (cached := _cached(root, settings, log)):  # another process built it meanwhile
            return cached
        started = time.perf_counter()
        kept = _kept_root(root)
        if kept.is_dir():
            log(f"  resuming an interrupted build: reusing the models it finished ({kept})")
        with atomic_directory(root, force=True) as tmp, worker_pool(workers) as pool:
            world = World(tmp, settings)
            _write_tasks(world)
            _train_models(world, pool, log, kept)
            log("  scoring every model on every task")
            world.scores = score_matrix(world, pool)
            world.build_seconds = time.perf_counter() - started
            (tmp / "world.json").write_text(json.dumps({"settings": asdict(settings), "scores": world.scores,
                                                        "build_seconds": world.build_seconds}, indent=2) + "\n")
    world.root = root
    shutil.rmtree(_kept_root(root), ignore_errors=True)  # the world is published: its kept models are not needed
    log(f"  world built in {world.build_seconds:.0f} s: {root}")
    return world


def _kept_root(root: Path) -> Path:
    """Where a build keeps each model it finished until the world is published (beside the cache
    entry, named by the same settings key), so an interrupted build resumes from them. A large
    world takes an hour or more to build; an interruption should not cost all of it."""
    return root.parent / f".{root.name}.kept"


def _cached(root: Path, settings: WorldSettings, log: Callable[[str], None]) -> World | None:
    manifest = root / "world.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    log(f"  reusing the demo world in {root}")
    return World(root, settings, data["scores"], data["build_seconds"])


@contextmanager
def _build_lock(root: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on ``.<root>.lock`` (released by the kernel if the holder dies)."""
    with open(root.parent / f".{root.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"  another process is building {root}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_tasks(world: World) -> None:
    settings = world.settings
    counts = {"train": settings.train_examples, "validation": settings.validation_examples,
              "test": settings.test_examples}
    for task in WORLD_TASKS:
        for split, count in counts.items():
            path = world.data_file(task.name, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in make_split(task, split, count, settings.seed)))
    if settings.base_kind == "instruction":  # only its base is trained on them; never scored by the grid
        for task in INSTRUCTION_TASKS:
            for split, count in (("train", settings.train_examples), ("test", settings.test_examples)):
                path = world.data_file(task.name, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for r in make_split(task, split, count, settings.seed)))
    for split in ("validation", "test"):
        tasks = [{"name": t.name, "category": t.category, "split": t.split, "kind": t.kind, "metric": t.metric,
                  "data": f"data/{t.name}/{split}.jsonl", "options": {"max_new_tokens": 8}} for t in WORLD_TASKS]
        world.tasks_file(split).write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))


def training_pairs(world: World, names: list[str], shares: dict[str, int] | None = None) -> list[dict[str, str]]:
    """The training pairs of ``names``, plus the first ``count`` of each task in ``shares``."""
    extra = [pair for name, count in (shares or {}).items() for pair in world.pairs(name, "train", count)]
    return [pair for name in names for pair in world.pairs(name, "train")] + extra


def _train_models(world: World, pool: WorkerPool, log: Callable[[str], None], kept: Path) -> None:
    settings = world.settings
    held_in = [t.name for t in WORLD_TASKS if t.split == "held_in"]
    general = [t.name for t in WORLD_TASKS if t.split != "held_in"]
    shares = {}
    if settings.base_kind == "pretrained":  # broad, weak competence on the held-in skills before the experts
        shares = {name: round(settings.pretrain_share * settings.train_examples) for name in held_in}
    first = world.root / "models" / "base-general" if settings.base_kind == "instruction" else world.base
    def keep(path: Path) -> Path:  # where a finished model is kept until the world is published
        return kept / path.relative_to(world.root)

    plain_base = _cached_plain_base(settings, kept.parent)  # (kept lies in the cache directory)
    if plain_base is not None:  # the same settings, seeds and data: the same bits, without the hour a large one takes
        shutil.copytree(plain_base, first)
        log(f"  base: {settings.base_steps} steps on the general mixture, taken from the cached plain world "
            f"({plain_base.parent.parent.name}), which trained it with the same settings and seeds")
    else:
        seconds = pool.submit(train_world_model, world, None, first, general, settings.base_steps,
                              settings.base_lr, settings.seed, shares, keep(first)).result()
        log(f"  base: {settings.base_steps} steps on the general mixture ({', '.join(general)})"
            + (f" and {settings.pretrain_share:.0%} of each held-in task" if shares else "") + f", {seconds:.0f} s")
    if settings.base_kind == "instruction":  # the FLAN analogue: instructions, with the general mixture kept
        mixture = [t.name for t in INSTRUCTION_TASKS] + general
        seconds = pool.submit(train_world_model, world, first, world.base, mixture, settings.instruction_steps,
                              settings.base_lr, settings.seed + 200, None, keep(world.base)).result()
        log(f"  instruction tuning of the base: {settings.instruction_steps} steps on {len(INSTRUCTION_TASKS)} "
            f"instruction tasks and the general mixture, {seconds:.0f} s")
    expert_steps, expert_lr, multitask_steps = settings.expert_schedule
    # every other model starts from the saved base (bit for bit the trained one) with its own seed
    units = [(f"expert '{name}'", [name], expert_steps, settings.seed + 1 + index, path)
             for index, (name, path) in enumerate(world.experts.items())]
    units.append(("multitask", held_in, multitask_steps, settings.seed + 100, world.multitask))
    runs = pool.imap(train_world_model, [(world, world.base, path, names, steps, expert_lr, seed, None, keep(path))
                                         for _, names, steps, seed, path in units])
    for (label, names, steps, _, _), seconds in zip(units, runs):
        what = "all held-in tasks" if label == "multitask" else f"'{names[0]}'"
        log(f"  {label}: {steps} steps on {what}, {seconds:.0f} s")


def _cached_plain_base(settings: WorldSettings, cache: Path) -> Path | None:
    """For an instruction world, the base of the cached plain world with the same settings: the
    instruction world's general base is trained exactly as that one (same data, seeds and steps),
    so it is that base bit for bit. None for other base kinds or when that world is not cached."""
    if settings.base_kind != "instruction":
        return None
    defaults = {f.name: f.default for f in fields(settings) if f.name in _FAMILY_FIELDS and f.name != "size"}
    plain = cache / f"world-{replace(settings, **{**defaults, 'base_kind': 'plain'}).key()}"
    return plain / "models" / "base" if (plain / "world.json").is_file() else None


def train_world_model(world: World, start: Path | None, out: Path, tasks: list[str], steps: int, lr: float,
                      seed: int, shares: dict[str, int] | None = None, keep: Path | None = None) -> float:
    """Train one model of the world on ``tasks`` (and the first ``shares[task]`` examples of other
    tasks) from scratch, or from the model saved in ``start``, and save it in ``out``; returns the
    seconds it took. A unit of ``build_world``.

    ``keep``: a finished model is also copied there (whole, or not at all), and a model already
    kept there is copied to ``out`` instead of being trained again (the same bits: training is
    seeded, and every later model starts from the saved one)."""
    from transformers import AutoModelForCausalLM

    done = keep / KEPT_MARKER if keep is not None else None
    if done is not None and done.is_file():
        shutil.copytree(keep, out, ignore=shutil.ignore_patterns(KEPT_MARKER))
        return float(json.loads(done.read_text())["seconds"])
    tick = time.perf_counter()
    settings = world.settings
    tokenizer = build_tokenizer(VOCABULARY)
    if start is None:
        model = tiny_llama(vocab_size=len(VOCABULARY), hidden=settings.hidden, layers=settings.layers,
                           heads=settings.heads, intermediate=settings.intermediate, tie=True, seed=settings.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(start)
    train(model, tokenizer, training_pairs(world, tasks, shares), steps, lr=lr, batch_size=settings.batch_size,
          seed=seed)
    save(model, tokenizer, out)
    seconds = time.perf_counter() - tick
    if keep is not None:
        staging = keep.with_name(keep.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(out, staging)
        (staging / KEPT_MARKER).write_text(json.dumps({"seconds": seconds}) + "\n")
        shutil.rmtree(keep, ignore_errors=True)
        staging.rename(keep)
    return seconds


KEPT_MARKER = "kept.json"  # a kept model is complete when this file is in its directory


def world_models(world: World) -> dict[str, Path]:
    """Every model of the world by name: base, expert-<task>..., multitask."""
    return {"base": world.base, **{f"expert-{k}": v for k, v in world.experts.items()}, "multitask": world.multitask}


def score_matrix(world: World, workers: int | WorkerPool | None = 1) -> dict[str, dict[str, float]]:
    """Every model's test score on every task (one model per unit of work)."""
    models = world_models(world)
    with worker_pool(workers) as pool:
        rows = pool.map(score_model, [(path, world.tasks_file("test")) for path in models.values()])
    return {name: scores for name, scores in zip(models, rows)}


def score_model(model_dir: Path, tasks_file: Path) -> dict[str, float]:
    """One model's test score on every task of a tasks file."""
    from mergelab.evaluate import evaluate_models

    return {r["task"]: r["score"] for r in evaluate_models([model_dir], tasks_file, progress=False,
                                                           batch_size=EVAL_BATCH)}


def forgetting_table(world: World) -> str:
    """Markdown: each model's score on each task (experts gain their task, lose others)."""
    names = [t.name for t in WORLD_TASKS]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, scores in world.scores.items():
        lines.append(f"| {model} | " + " | ".join(f"{scores[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)
