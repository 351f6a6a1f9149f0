"""The demo's merging studies on the demo world: every method side by side, and the
LM-Cocktail paper's experiments (Tables 1/3, the few-shot study of Table 7, Figure 1's α sweep).

Each study returns plain data (JSON-ready) that the report turns into tables and verdicts;
nothing here is hard-coded: every number comes from a merge and an evaluation run here.
"""

from __future__ import annotations

import random
import shutil
from functools import lru_cache
from pathlib import Path
from statistics import mean
from typing import Callable

from mergelab.cocktail import alpha_sweep, cocktail
from mergelab.demo.world import EVAL_BATCH, World
from mergelab.evaluate import evaluate_models
from mergelab.parallel import WorkerPool, worker_pool

COCKTAIL_TARGETS = ("add", "review", "lookup")
FEW_SHOT = (5, 50, 100)


def score_all(model_dir: Path, world: World) -> dict[str, float]:
    """Test score of one model directory on every world task. A merge whose weights are those of
    a world model, bit for bit (the α sweep's ends: α = 0 is the base, α = 1 the expert), gets
    that model's scores, measured when the world was built, instead of being scored again."""
    known = _world_digests(world.root).get(weights_digest(model_dir))
    if known is not None:
        return dict(world.scores[known])
    return {r["task"]: r["score"] for r in evaluate_models([model_dir], test_tasks(world.tasks_file("test")),
                                                           batch_size=EVAL_BATCH, progress=False)}


def weights_digest(model_dir: Path) -> str:
    """A digest of a model directory's tensors (names, dtypes, shapes and bytes), not of its files."""
    import hashlib

    import torch
    from safetensors import safe_open

    digest = hashlib.sha1()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, "pt") as tensors:
            for name in sorted(tensors.keys()):
                tensor = tensors.get_tensor(name).contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@lru_cache(maxsize=4)
def _world_digests(root: Path) -> dict[str, str]:
    """``{weights digest: model name}`` of a world's models (once per process)."""
    from mergelab.demo.world import World, world_models

    return {weights_digest(path): name for name, path in world_models(World(root, None)).items()}


@lru_cache(maxsize=4)
def test_tasks(tasks_file: Path):
    """The world's tasks, read once per process (every unit of work scores on the same ones)."""
    from mergelab.evaluate import load_tasks

    return tuple(load_tasks(tasks_file))


def split_scores(scores: dict[str, float], target: str) -> dict[str, float]:
    others = [v for k, v in scores.items() if k != target]
    return {"target": scores[target], "others": sum(others) / len(others)}


def every_method_study(world: World, out: Path, log: Callable[[str], None],
                       workers: int | WorkerPool | None = 1) -> dict:
    """Base + three experts merged with every registered method and with AdaMerging, scored on
    every task (each expert's Fisher and RegMean Grams first, then one method, per unit of work)."""
    from mergelab.demo import demo_configs
    from mergelab.methods import METHODS

    experts = {t: world.experts[t] for t in COCKTAIL_TARGETS}
    rows = {"base": world.scores["base"], **{f"expert-{t}": world.scores[f"expert-{t}"] for t in experts}}
    needed = {p.name for method in METHODS.values() for p in method.tensor_files}  # fisher, gram
    with worker_pool(workers) as pool:
        units = {kind: {task: pool.submit(STATISTICS[kind], world, task, path, out / kind / f"{task}.safetensors")
                        for task, path in experts.items()} for kind in sorted(needed)}
        adamerged = pool.submit(adamerging_of, world, experts, out / "models" / "adamerging")
        files = {kind: {task: unit.result() for task, unit in by_task.items()} for kind, by_task in units.items()}
        configs = demo_configs({"base": world.base, **experts}, files, list(experts))
        scored = pool.imap(merge_and_score, [(world, config, out / "models" / method)
                                             for method, config in configs.items()])
        for method, scores in zip(configs, scored):
            rows[method] = scores
            log(f"    {method}")
        rows["adamerging"] = adamerged.result()
        log("    adamerging")
    return {"experts": list(experts), "scores": rows}


def fisher_of(world: World, task: str, model_dir: Path, out_path: Path) -> Path:
    """The diagonal Fisher of one expert on 32 validation examples of its task (a unit of work)."""
    from mergelab.fisher import estimate_fisher

    texts = [f"{e['input']} {e['output']}" for e in world.pairs(task, "validation", 32)]
    return estimate_fisher(model_dir, texts, out_path, force=True)


def gram_of(world: World, task: str, model_dir: Path, out_path: Path) -> Path:
    """RegMean's input Grams of one expert on the validation examples of its task (a unit of work)."""
    from mergelab.grams import regmean_stats

    return regmean_stats(model_dir, world.data_file(task, "validation"), out_path, force=True, quiet=True)


STATISTICS = {"fisher": fisher_of, "gram": gram_of}  # a tensor-file parameter -> how an expert's file is made


def adamerging_of(world: World, experts: dict[str, Path], target: Path) -> dict[str, float]:
    """AdaMerging of base + ``experts`` (λ learned on their tasks' unlabeled validation inputs, with
    the demo's settings), scored on every task, then deleted (a unit of work)."""
    from mergelab.adamerging import adamerging
    from mergelab.demo import DEMO_PARAMETERS

    adamerging(world.base, [(path, world.data_file(task, "validation")) for task, path in experts.items()], target,
               force=True, quiet=True, **DEMO_PARAMETERS["adamerging"])
    try:
        return score_all(target, world)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def merge_and_score(world: World, config: dict, target: Path) -> dict[str, float]:
    """Merge ``config`` into ``target``, score it on every task, delete it (a unit of work)."""
    from mergelab import merge

    merge(config, target, force=True, quiet=True)
    try:
        return score_all(target, world)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def cocktail_study(world: World, out: Path, log: Callable[[str], None], alphas=None,
                   workers: int | WorkerPool | None = 1, seeds: tuple[int, ...] = (0,)) -> dict:
    """For each target task: base, expert, LM-Cocktail (full, 5 examples), mono-specialist;
    the few-shot study (5 / 50 / 100 examples); and the α sweep on the first target. Each
    merge (and the sweep) is a unit of work.

    ``seeds``: picks of the 5 few-shot examples (seed 0: the first five validation examples;
    others: a seeded sample). The LM-Cocktail row is their mean, with every seed's scores under
    ``cocktail["seeds"]``; the 50/100-example rows and the mono-specialist (no examples) are one run."""
    sweep_target = COCKTAIL_TARGETS[0]
    with worker_pool(workers) as pool:
        sweep = pool.submit(sweep_of, world, sweep_target, out / "sweep", alphas)
        few_shot = pool.imap(cocktail_of, [(world, target, count, out / "models" / f"{target}-full-{count}")
                                           for target in COCKTAIL_TARGETS for count in FEW_SHOT])
        extra = [seed for seed in seeds if seed != 0]
        picks = pool.imap(cocktail_of, [(world, target, FEW_SHOT[0], out / "models" / f"{target}-seed{seed}", seed)
                                        for target in COCKTAIL_TARGETS for seed in extra])
        mono = pool.imap(cocktail_of, [(world, target, None, out / "models" / f"{target}-mono")
                                       for target in COCKTAIL_TARGETS])
        results = {"targets": {}, "sweep": None}
        for target in COCKTAIL_TARGETS:
            entry = {"base": split_scores(world.scores["base"], target),
                     "expert": split_scores(world.scores[f"expert-{target}"], target),
                     "few_shot": {str(count): next(few_shot) for count in FEW_SHOT}}
            runs = ([entry["few_shot"][str(FEW_SHOT[0])]] if 0 in seeds else []) + [next(picks) for _ in extra]
            entry["cocktail"] = {"target": mean(r["target"] for r in runs), "others": mean(r["others"] for r in runs),
                                 "seeds": {"target": [r["target"] for r in runs],
                                           "others": [r["others"] for r in runs]}}
            results["targets"][target] = entry
        for target in COCKTAIL_TARGETS:
            entry = results["targets"][target]
            entry["mono"] = {k: v for k, v in next(mono).items() if k != "weights"}
            log(f"    target '{target}': expert {entry['expert']['target']:.2f}/{entry['expert']['others']:.2f}, "
                f"cocktail {entry['cocktail']['target']:.2f}/{entry['cocktail']['others']:.2f} (target/others)")
        rows = sweep.result()
    results["sweep"] = {"target": sweep_target, "rows": [{"alpha": r["alpha"], "target": r["target"],
                                                          "others": r["general"]} for r in rows],
                        "plot": str(out / "sweep" / "sweep.png")}
    shutil.rmtree(out / "models", ignore_errors=True)
    return results


def cocktail_of(world: World, target: str, count: int | None, merged: Path, seed: int = 0) -> dict:
    """LM-Cocktail for one target (a unit of work): the full recipe with weights from ``count``
    validation examples (seed 0: the first ones; another seed: a seeded sample), or
    (``count=None``) the mono-specialist; scored, then deleted."""
    expert = world.experts[target]
    peers = [path for name, path in world.experts.items() if name != target]
    if count is None:
        decision = cocktail(merged, finetuned=expert, base=world.base, recipe="mono", alpha=0.5, force=True)
        names = ["base"]
    else:
        examples = world.pairs(target, "validation")
        examples = examples[:count] if seed == 0 else random.Random(f"{target}:{seed}").sample(examples, count)
        decision = cocktail(merged, finetuned=expert, base=world.base, peers=peers, examples=examples,
                            recipe="full", alpha=0.5, force=True)
        names = ["base", *[Path(p).name for p in peers]]
    try:
        scores = split_scores(score_all(merged, world), target)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    return {**scores, "weights": dict(zip(names, decision.weights))}


def sweep_of(world: World, target: str, out: Path, alphas=None) -> list[dict]:
    """Figure 1's α sweep of the mono-specialist on ``target`` (a unit of work)."""
    return alpha_sweep(out, finetuned=world.experts[target], base=world.base, target=[target],
                       evaluate=lambda model_dir: score_all(model_dir, world), **({"alphas": alphas} if alphas else {}))
