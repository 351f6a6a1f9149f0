"""The demo's merging studies on the demo world: every method side by side, and the
LM-Cocktail paper's experiments (Tables 1/3, the few-shot study of Table 7, Figure 1's α sweep).

Each study returns plain data (JSON-ready) that the report turns into tables and verdicts;
nothing here is hard-coded: every number comes from a merge and an evaluation run here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from mergelab.cocktail import alpha_sweep, cocktail
from mergelab.demo.world import World
from mergelab.evaluate import evaluate_models

COCKTAIL_TARGETS = ("add", "review", "lookup")
FEW_SHOT = (5, 50, 100)


def score_all(model_dir: Path, world: World) -> dict[str, float]:
    """Test score of one model directory on every world task."""
    return {r["task"]: r["score"] for r in evaluate_models([model_dir], world.tasks("test"), batch_size=64,
                                                           progress=False)}


def split_scores(scores: dict[str, float], target: str) -> dict[str, float]:
    others = [v for k, v in scores.items() if k != target]
    return {"target": scores[target], "others": sum(others) / len(others)}


def every_method_study(world: World, out: Path, log: Callable[[str], None]) -> dict:
    """Base + three experts merged with every registered method, scored on every task."""
    from mergelab import merge
    from mergelab.demo import demo_configs
    from mergelab.fisher import estimate_fisher

    experts = {t: world.experts[t] for t in COCKTAIL_TARGETS}
    fishers = {}
    for task, path in experts.items():
        texts = [f"{e['input']} {e['output']}" for e in world.pairs(task, "validation", 32)]
        fishers[task] = estimate_fisher(path, texts, out / "fisher" / f"{task}.safetensors", force=True)
    rows = {"base": world.scores["base"], **{f"expert-{t}": world.scores[f"expert-{t}"] for t in experts}}
    for method, config in demo_configs({"base": world.base, **experts}, fishers, list(experts)).items():
        target = out / "models" / method
        merge(config, target, force=True, quiet=True)
        rows[method] = score_all(target, world)
        shutil.rmtree(target)
        log(f"    {method}")
    return {"experts": list(experts), "scores": rows}


def cocktail_study(world: World, out: Path, log: Callable[[str], None], alphas=None) -> dict:
    """For each target task: base, expert, LM-Cocktail (full, 5 examples), mono-specialist;
    the few-shot study (5 / 50 / 100 examples); and the α sweep on the first target."""
    results = {"targets": {}, "sweep": None}
    for target in COCKTAIL_TARGETS:
        expert = world.experts[target]
        peers = [path for name, path in world.experts.items() if name != target]
        entry = {"base": split_scores(world.scores["base"], target),
                 "expert": split_scores(world.scores[f"expert-{target}"], target), "few_shot": {}}
        for count in FEW_SHOT:
            merged = out / "models" / f"{target}-full-{count}"
            decision = cocktail(merged, finetuned=expert, base=world.base, peers=peers,
                                examples=world.pairs(target, "validation", count), recipe="full", alpha=0.5,
                                force=True)
            scores = split_scores(score_all(merged, world), target)
            shutil.rmtree(merged)
            entry["few_shot"][str(count)] = {**scores, "weights": dict(zip(["base", *[Path(p).name for p in peers]],
                                                                           decision.weights))}
        entry["cocktail"] = {k: v for k, v in entry["few_shot"]["5"].items() if k != "weights"}
        merged = out / "models" / f"{target}-mono"
        cocktail(merged, finetuned=expert, base=world.base, recipe="mono", alpha=0.5, force=True)
        entry["mono"] = split_scores(score_all(merged, world), target)
        shutil.rmtree(merged)
        results["targets"][target] = entry
        log(f"    target '{target}': expert {entry['expert']['target']:.2f}/{entry['expert']['others']:.2f}, "
            f"cocktail {entry['cocktail']['target']:.2f}/{entry['cocktail']['others']:.2f} (target/others)")
    target = COCKTAIL_TARGETS[0]
    rows = alpha_sweep(out / "sweep", finetuned=world.experts[target], base=world.base, target=[target],
                       evaluate=lambda model_dir: score_all(model_dir, world), **({"alphas": alphas} if alphas else {}))
    results["sweep"] = {"target": target, "rows": [{"alpha": r["alpha"], "target": r["target"],
                                                    "others": r["general"]} for r in rows],
                        "plot": str(out / "sweep" / "sweep.png")}
    shutil.rmtree(out / "models", ignore_errors=True)
    return results
