"""The scale and regime study (issue 15, docs/scale-study.md): the demo world in several sizes
and base kinds, the merging-at-scale grid on each, LM-Cocktail on each, and one verdict per
claim computed from the results with ``mergelab.evaluate.evidence``.

``run_scale_study`` builds (or reuses) every world, runs the grids (local workers or Ray) and the
cocktail runs, and writes ``OUT/report.md``, ``OUT/results.json``, ``OUT/verdicts.json`` and the
figures. The verdict functions (``scale_claims``, ``cocktail_claims``) take plain records, so
they can be checked on hand-made tables.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import random
import shutil
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mergelab.errors import MergelabError
from mergelab.evaluate.evidence import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTED, PARTLY, REPRODUCED, combine, \
    compare, summarize

SPLITS = ("held_in", "held_out")
METHODS = ("averaging", "task_arithmetic", "ties", "dare_ties")  # the demo grid's (mergelab.demo.demo_spec)
TOLERANCE = 0.05  # ε of the LM-Cocktail paper, in accuracy points (as the demo's report)
SHOTS = 5  # few-shot examples LM-Cocktail's weights are computed from


@dataclass(frozen=True)
class ScaleConfig:
    """What the study runs. The defaults are the full study of docs/scale-study.md."""

    sizes: tuple[str, ...] = ("small", "medium", "large")
    methods: tuple[str, ...] = METHODS
    base_kinds: tuple[str, ...] = ("plain", "instruction", "pretrained")
    n_experts: tuple[int, ...] = (2, 4, 6, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    cocktail_targets: tuple[str, ...] = ("add", "review", "lookup")
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    world: dict = field(default_factory=dict)  # WorldSettings overrides shared by every world

    def settings(self, size: str, base_kind: str):
        from mergelab.demo.world import WorldSettings

        return WorldSettings(size=size, base_kind=base_kind, **self.world)


# The smoke version (`--quick`): tiny models, short training, few test examples; meaningless numbers.
QUICK = ScaleConfig(
    sizes=("tiny", "mini"), methods=("averaging", "ties"), n_experts=(2, 4), seeds=(0, 1), cocktail_targets=("add",),
    alphas=(0.5, 1.0),
    world=dict(train_examples=200, validation_examples=20, test_examples=20, base_steps=30, expert_steps=10,
               multitask_steps=30, instruction_steps=15, light_expert_steps=5))


def check_seeds(seeds: Sequence[int] | None, default: Sequence[int]) -> tuple[int, ...]:
    """Two or more distinct non-negative seeds (a verdict needs the seeds' spread)."""
    if seeds is None:
        return tuple(default)
    seeds = tuple(seeds)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise MergelabError(f"seeds must be whole numbers, 0 or more; got {list(seeds)}")
    if len(set(seeds)) < 2:
        raise MergelabError(f"give at least two distinct seeds (a verdict needs their spread); got {list(seeds)}")
    return tuple(dict.fromkeys(seeds))


def run_scale_study(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
                    workers: int | None = None, executor: str = "local", address: str | None = None,
                    cache: str | Path | None = None, force: bool = False, config: ScaleConfig | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Run the study into ``out`` (published whole, or not at all); returns the results.

    The worlds are built once and cached (``mergelab.demo.world.build_world``); each world's grid
    and cocktail runs are kept beside it in the cache, so an interrupted study resumes where it
    stopped. ``executor="ray"`` runs the grid cells on Ray (``address``: an existing cluster).
    """
    from mergelab.devices import torch_threads
    from mergelab.loading import quiet_transformers
    from mergelab.outdir import atomic_directory, check_output_dir
    from mergelab.parallel import check_workers, worker_pool

    config = config or (QUICK if quick else ScaleConfig())
    config = replace(config, seeds=check_seeds(seeds, config.seeds))
    if executor not in ("local", "ray"):
        raise MergelabError(f"executor '{executor}' is not known; use local or ray")
    if address is not None and executor != "ray":
        raise MergelabError("--address names a Ray cluster; give it with --executor ray")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise MergelabError("--executor ray needs Ray: pip install 'mergelab[distributed]'") from None
    workers = check_workers(workers, "--workers")
    for size in config.sizes:  # unknown sizes or kinds are refused before any world is built
        for kind in config.base_kinds:
            config.settings(size, kind)
    check_output_dir(out, force)
    started = time.perf_counter()
    results: dict = {"config": {**asdict(config), "quick": quick}, "worlds": [], "grid": [], "multitask": [],
                     "cocktail": [], "cocktail_experts": [], "sweeps": [], "workers": workers, "executor": executor}
    # the study logs its own progress: transformers' bars off here and in the workers (they inherit it)
    with quiet_transformers(), atomic_directory(out, force) as tmp, worker_pool(workers) as pool, torch_threads(1):
        for size in config.sizes:
            for kind in config.base_kinds:
                results_of_world(config, size, kind, results, pool, executor, address, cache, log)
        results["seconds"] = time.perf_counter() - started
        results["world_build_seconds"] = sum(w["seconds_here"] for w in results["worlds"])  # 0 when all cached
        results["claims"] = scale_claims(results["grid"], results["multitask"], config.sizes, config.base_kinds)
        results["cocktail_claims"] = cocktail_claims(results["cocktail"], results["cocktail_experts"],
                                                     results["sweeps"], config.sizes, config.base_kinds)
        write_outputs(results, tmp)
    log(f"scale study written to {out} ({results['seconds']:.0f} s)")
    return results


def results_of_world(config: ScaleConfig, size: str, kind: str, results: dict, pool, executor: str,
                     address: str | None, cache, log: Callable[[str], None]) -> None:
    """Build (or reuse) one world, run (or resume) its grid and cocktail runs, add their records."""
    from mergelab.demo.world import build_world, default_cache

    settings = config.settings(size, kind)
    log(f"[{settings.name}] world")
    tick = time.perf_counter()
    world = build_world(settings, cache=cache, log=lambda message: log(f"  {message.strip()}"), workers=pool)
    results["worlds"].append({"size": size, "base_kind": kind, "name": settings.name, "key": settings.key(),
                              "settings": asdict(settings), "parameters": parameter_count(world.base),
                              "build_seconds": world.build_seconds,
                              "seconds_here": time.perf_counter() - tick})
    work = Path(cache or default_cache()) / "scale-study" / f"{settings.key()}-{_digest(config)}"
    work.mkdir(parents=True, exist_ok=True)
    with _lock(work):
        tick = time.perf_counter()
        log(f"[{settings.name}] grid: {len(config.methods)} methods × n {list(config.n_experts)} × seeds "
            f"{list(config.seeds)}")
        grid_records, multitask = run_world_grid(world, config, work / "grid", pool, executor, address)
        results["grid"] += [{"size": size, "base_kind": kind, **r} for r in grid_records]
        results["multitask"].append({"size": size, "base_kind": kind, **multitask})
        results["worlds"][-1]["grid_seconds"] = time.perf_counter() - tick
        tick = time.perf_counter()
        log(f"[{settings.name}] LM-Cocktail: targets {list(config.cocktail_targets)} × seeds {list(config.seeds)}")
        cocktail = run_world_cocktail(world, config, work / "cocktail.json", pool)
        for key in ("cocktail", "cocktail_experts", "sweeps"):
            results[key] += [{"size": size, "base_kind": kind, **r} for r in cocktail[key]]
        results["worlds"][-1]["cocktail_seconds"] = time.perf_counter() - tick


def _digest(config: ScaleConfig) -> str:
    """Names a world's grid and cocktail runs by what they depend on besides the world."""
    payload = json.dumps({"methods": config.methods, "n": config.n_experts, "seeds": config.seeds,
                          "targets": config.cocktail_targets, "alphas": config.alphas, "shots": SHOTS})
    return hashlib.sha1(payload.encode()).hexdigest()[:8]


@contextmanager
def _lock(work: Path) -> Iterator[None]:
    """One study at a time works on a world's runs (a second one waits, then reuses them)."""
    with open(work / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def parameter_count(model_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (tied embeddings once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def run_world_grid(world, config: ScaleConfig, work: Path, pool, executor: str, address: str | None):
    """The merging grid on one world (``run_grid`` resumes in ``work``): per-seed records
    ``{method, n_experts, seed, held_in, held_out}`` and the multitask model's splits."""
    from mergelab.demo import demo_spec
    from mergelab.experiments import run_grid
    from mergelab.experiments.runner import read_results

    spec = demo_spec(world, n_experts=config.n_experts, seeds=config.seeds)
    spec = spec.model_copy(update={"methods": [m for m in spec.methods if m.name in config.methods]})
    run_grid(spec, work, executor=executor, address=address, workers=pool, log=lambda *_: None)
    return per_seed_records(read_results(work / "results.csv"), spec.load_tasks())


def per_seed_records(rows: list[dict], tasks) -> tuple[list[dict], dict]:
    """Normalized held-in and held-out of each (method, n_experts, seed) merge, as the paper
    aggregates them (within categories, then across); and the multitask model's."""
    from mergelab.evaluate import normalized_performance

    by_task = {t.name: t for t in tasks}
    base = {r["task"]: float(r["score"]) for r in rows if r["method"] == "base"}
    expert = {r["task"]: float(r["score"]) for r in rows if r["method"] == "expert"}
    groups: dict[tuple[str, int, int], dict[str, float]] = {}
    for row in rows:
        if row["method"] not in ("base", "expert", "multitask"):
            groups.setdefault((row["method"], int(row["n_experts"]), int(row["seed"])), {})[row["task"]] = \
                float(row["score"])
    records = []
    for (method, n, seed), scores in sorted(groups.items()):
        splits = normalized_performance(scores, [by_task[t] for t in scores], expert, base)["splits"]
        records.append({"method": method, "n_experts": n, "seed": seed,
                        **{split: splits.get(split, float("nan")) for split in SPLITS}})
    multitask = {r["task"]: float(r["score"]) for r in rows if r["method"] == "multitask"}
    splits = normalized_performance(multitask, [by_task[t] for t in multitask], expert, base)["splits"]
    return records, {split: splits.get(split, float("nan")) for split in SPLITS}


def run_world_cocktail(world, config: ScaleConfig, path: Path, pool) -> dict:
    """LM-Cocktail on one world (kept in ``path``, reused when present): for each target and
    seed, the full recipe with weights from ``SHOTS`` validation examples that the seed picks;
    each target's expert; and the α sweep of the mono-specialist on each target."""
    from mergelab.demo.studies import sweep_of

    if path.is_file():
        return json.loads(path.read_text())
    scratch = path.parent / "cocktail-models"
    shutil.rmtree(scratch, ignore_errors=True)
    units = [(world, target, seed, scratch / f"{target}-{seed}") for target in config.cocktail_targets
             for seed in config.seeds]
    sweeps = [pool.submit(sweep_of, world, target, scratch / f"sweep-{target}", config.alphas)
              for target in config.cocktail_targets]
    runs = pool.map(cocktail_with_seed, units)
    result = {
        "cocktail": [{"target": target, "seed": seed, "score": scores["target"], "others": scores["others"]}
                     for (_, target, seed, _), scores in zip(units, runs)],
        "cocktail_experts": [_expert_record(world, target) for target in config.cocktail_targets],
        "sweeps": [{"target": target, "rows": [{"alpha": r["alpha"], "target": r["target"], "others": r["general"]}
                                              for r in future.result()]}
                   for target, future in zip(config.cocktail_targets, sweeps)],
    }
    shutil.rmtree(scratch, ignore_errors=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)
    return result


def _expert_record(world, target: str) -> dict:
    from mergelab.demo.studies import split_scores

    expert, base = (split_scores(world.scores[model], target) for model in (f"expert-{target}", "base"))
    return {"target": target, "score": expert["target"], "others": expert["others"], "base_score": base["target"],
            "base_others": base["others"]}


def cocktail_with_seed(world, target: str, seed: int, merged: Path) -> dict:
    """LM-Cocktail's full recipe for ``target`` with the ``SHOTS`` validation examples that
    ``seed`` picks (a unit of work): target and other-task scores; the model is deleted."""
    from mergelab.cocktail import cocktail
    from mergelab.demo.studies import score_all, split_scores

    pool = world.pairs(target, "validation")
    examples = random.Random(f"scale-cocktail:{target}:{seed}").sample(pool, min(SHOTS, len(pool)))
    peers = [p for name, p in world.experts.items() if name != target]
    cocktail(merged, finetuned=world.experts[target], base=world.base, peers=peers, examples=examples,
             recipe="full", alpha=0.5, force=True)
    try:
        return split_scores(score_all(merged, world), target)
    finally:
        shutil.rmtree(merged, ignore_errors=True)


# -- verdicts --------------------------------------------------------------------------------------

def _values(records: list[dict], **where) -> dict[int, list[float]]:
    """seed -> the values of ``where['split']`` of the matching records (one per n_experts)."""
    split = where.pop("split")
    by_seed: dict[int, list[float]] = {}
    for r in records:
        if all(r[k] == v for k, v in where.items()):
            by_seed.setdefault(r["seed"], []).append(r[split])
    return by_seed


def over_n(records, size, kind, method, split) -> list[float]:
    """Per seed: the mean over numbers of experts of one method's normalized ``split``."""
    by_seed = _values(records, size=size, base_kind=kind, method=method, split=split)
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def at_n(records, size, kind, method, n, split) -> list[float]:
    """Per seed: one method's normalized ``split`` with ``n`` experts."""
    by_seed = _values(records, size=size, base_kind=kind, method=method, n_experts=n, split=split)
    return [v[0] for _, v in sorted(by_seed.items())]


def _tally(parts: list[str]) -> str:
    counts = {v: parts.count(v) for v in (REPRODUCED, PARTLY, NOT_REPRODUCED, INCONCLUSIVE)}
    partly = f"{counts[PARTLY]} partly, " if counts[PARTLY] else ""
    return (f"{counts[REPRODUCED]}/{len(parts)} parts reproduced, {partly}{counts[NOT_REPRODUCED]} reversed, "
            f"{counts[INCONCLUSIVE]} inconclusive")


def _claim(claim: str, parts: list[str], numbers: str, table: list[str], why_untested: str = "") -> dict:
    verdict = combine(parts)
    if not parts:
        return {"claim": claim, "verdict": NOT_TESTED, "line": f"- {claim}: **not tested** ({why_untested}).",
                "table": []}
    return {"claim": claim, "verdict": verdict, "line": f"- {claim} ({numbers}): **{verdict}** ({_tally(parts)}).",
            "table": table}


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def scale_claims(records: list[dict], multitask: list[dict], sizes: Sequence[str], kinds: Sequence[str]) -> list[dict]:
    """One verdict per merging-at-scale claim (docs/scale-study.md), computed from per-seed
    records ``{size, base_kind, method, n_experts, seed, held_in, held_out}`` and the multitask
    models' ``{size, base_kind, held_in, held_out}``. Each claim: ``{claim, verdict, line, table}``."""
    sizes = [s for s in sizes if any(r["size"] == s for r in records)]
    kinds = [k for k in kinds if any(r["base_kind"] == k for r in records)]
    methods = list(dict.fromkeys(r["method"] for r in records))
    ns = sorted({r["n_experts"] for r in records})
    small, large = (sizes[0], sizes[-1]) if sizes else (None, None)
    claims = []

    # 1. larger models merge better
    parts, table = [], ["Normalized score, mean over n per seed, per size:", "",
                        "| base kind | method | split | " + " | ".join(sizes) + " | verdict |",
                        "|---|---|---|" + "---|" * (len(sizes) + 1)]
    for kind in kinds:
        for method in methods:
            for split in SPLITS:
                verdict = compare(over_n(records, large, kind, method, split), over_n(records, small, kind, method,
                                                                                       split))
                parts.append(verdict)
                table.append(f"| {kind} | {method} | {split} | " + " | ".join(
                    str(summarize(over_n(records, s, kind, method, split))) for s in sizes) + f" | {verdict} |")
    def across_methods(size, kind, split):
        return _mean([_mean(over_n(records, size, kind, m, split)) for m in methods])

    numbers = "; ".join(f"{kind} {split.replace('_', '-')} {across_methods(small, kind, split):.2f}"
                        f"→{across_methods(large, kind, split):.2f}" for kind in kinds for split in SPLITS)
    claims.append(_claim("Merging is better with larger models", parts if len(sizes) > 1 else [],
                         f"normalized, mean over methods and n, {small}→{large}: {numbers}", table,
                         "one model size"))

    # 2. instruction-tuned bases merge better
    parts, table = [], ["Normalized score, mean over n per seed:", "",
                        "| size | method | split | plain | instruction | verdict |", "|---|---|---|---|---|---|"]
    if "plain" in kinds and "instruction" in kinds:
        for size in sizes:
            for method in methods:
                for split in SPLITS:
                    it, plain = over_n(records, size, "instruction", method, split), over_n(records, size, "plain",
                                                                                            method, split)
                    verdict = compare(it, plain)
                    parts.append(verdict)
                    table.append(f"| {size} | {method} | {split} | {summarize(plain)} | {summarize(it)} | {verdict} |")
    numbers = "; ".join(f"{size} {split.replace('_', '-')} {across_methods(size, 'plain', split):.2f}"
                        f"→{across_methods(size, 'instruction', split):.2f}" for size in sizes for split in SPLITS)
    claims.append(_claim("Merging is better with instruction-tuned bases", parts,
                         f"normalized, mean over methods and n, plain→instruction: {numbers}", table,
                         "needs the plain and instruction base kinds"))

    # 3. more experts help held-out, mostly at large scale
    parts, table = [], [f"Held-out gain from n={ns[0] if ns else '-'} to n={ns[-1] if ns else '-'} experts, per size:",
                        "", "| base kind | method | " + " | ".join(sizes) + " | verdict |",
                        "|---|---|" + "---|" * (len(sizes) + 1)]
    gains: dict[tuple[str, str, str], list[float]] = {}
    if len(ns) > 1:
        for kind in kinds:
            for method in methods:
                for size in sizes:
                    high, low = at_n(records, size, kind, method, ns[-1], "held_out"), \
                        at_n(records, size, kind, method, ns[0], "held_out")
                    gains[kind, method, size] = [a - b for a, b in zip(high, low)]  # same picks per seed
                verdict = compare(gains[kind, method, large], gains[kind, method, small])
                parts.append(verdict)
                table.append(f"| {kind} | {method} | " + " | ".join(str(summarize(gains[kind, method, s]))
                                                                    for s in sizes) + f" | {verdict} |")
    numbers = "; ".join(f"{kind} {small} {_mean([_mean(gains[kind, m, small]) for m in methods]):+.2f}, "
                        f"{large} {_mean([_mean(gains[kind, m, large]) for m in methods]):+.2f}"
                        for kind in kinds) if gains else ""
    claims.append(_claim("More experts help held-out generalization, mostly at large scale",
                         parts if len(sizes) > 1 else [],
                         f"held-out gain from n={ns[0] if ns else '-'} to n={ns[-1] if ns else '-'}, mean over "
                         f"methods: {numbers}", table, "needs two sizes and two numbers of experts"))

    # 4. methods become alike at scale
    parts, table = [], [f"Spread between methods (max − min) at n={ns[-1] if ns else '-'} experts, per size:", "",
                        "| base kind | split | " + " | ".join(sizes) + " | verdict |",
                        "|---|---|" + "---|" * (len(sizes) + 1)]
    spreads: dict[tuple[str, str, str], list[float]] = {}
    for kind in kinds:
        for split in SPLITS:
            for size in sizes:
                per_method = [at_n(records, size, kind, m, ns[-1], split) for m in methods]
                spreads[kind, split, size] = [max(v) - min(v) for v in zip(*per_method)]
            verdict = compare(spreads[kind, split, small], spreads[kind, split, large])
            parts.append(verdict)
            table.append(f"| {kind} | {split} | " + " | ".join(str(summarize(spreads[kind, split, s])) for s in sizes)
                         + f" | {verdict} |")
    numbers = "; ".join(f"{kind} {split.replace('_', '-')} {_mean(spreads[kind, split, small]):.2f}→"
                        f"{_mean(spreads[kind, split, large]):.2f}" for kind in kinds for split in SPLITS)
    claims.append(_claim("Methods become alike at scale", parts if len(sizes) > 1 and len(methods) > 1 else [],
                         f"max − min over methods at n={ns[-1] if ns else '-'}, {small}→{large}: {numbers}", table,
                         "needs two sizes and two methods"))

    # 5. large merged models beat multitask on held-out
    parts, table = [], [f"Normalized held-out at {large} with n={ns[-1] if ns else '-'} experts:", "",
                        "| base kind | method | merged | multitask | verdict |", "|---|---|---|---|---|"]
    reference = {(m["size"], m["base_kind"]): m["held_out"] for m in multitask}
    for kind in kinds:
        if (large, kind) not in reference:
            continue
        for method in methods:
            merged = at_n(records, large, kind, method, ns[-1], "held_out")
            verdict = compare(merged, reference[large, kind])
            parts.append(verdict)
            table.append(f"| {kind} | {method} | {summarize(merged)} | {reference[large, kind]:.2f} | {verdict} |")
    best = {kind: max(_mean(at_n(records, large, kind, m, ns[-1], "held_out")) for m in methods) for kind in kinds
            if (large, kind) in reference}
    numbers = "; ".join(f"{kind} best {value:.2f} vs {reference[large, kind]:.2f}" for kind, value in best.items())
    claims.append(_claim("Large merged models beat multitask training on held-out tasks", parts,
                         f"normalized held-out at {large}, n={ns[-1] if ns else '-'}, merged vs multitask: {numbers}",
                         table, "no multitask model at the largest size"))
    return claims


def cocktail_claims(runs: list[dict], experts: list[dict], sweeps: list[dict], sizes: Sequence[str],
                    kinds: Sequence[str]) -> list[dict]:
    """LM-Cocktail's three verdicts per size and base kind, then one summary per verdict saying
    where it reproduced. ``runs``: ``{size, base_kind, target, seed, score, others}`` (``score``:
    the target task's); ``experts``: ``{size, base_kind, target, score, others}``; ``sweeps``:
    ``{size, base_kind, target, rows: [{alpha, target, others}]}``."""
    claims, where = [], {"kept": [], "recovered": [], "sweep": []}
    for size in sizes:
        for kind in kinds:
            mine = [r for r in runs if r["size"] == size and r["base_kind"] == kind]
            if not mine:
                continue
            name = f"{size} {kind}"
            targets = list(dict.fromkeys(r["target"] for r in mine))
            expert = {e["target"]: e for e in experts if e["size"] == size and e["base_kind"] == kind}
            score = {t: [r["score"] for r in mine if r["target"] == t] for t in targets}
            others = {t: [r["others"] for r in mine if r["target"] == t] for t in targets}
            kept = [compare(score[t], expert[t]["score"], tolerance=TOLERANCE) for t in targets]
            recovered = [compare(others[t], expert[t]["others"]) for t in targets]
            claims.append(_claim(
                f"LM-Cocktail keeps the target within ε={TOLERANCE} of the expert ({name})", kept,
                "target, expert → cocktail over seeds: " + ", ".join(
                    f"{t} {expert[t]['score']:.2f}→{summarize(score[t])}" for t in targets), []))
            claims.append(_claim(
                f"LM-Cocktail recovers the other tasks ({name})", recovered,
                "others, expert → cocktail over seeds: " + ", ".join(
                    f"{t} {expert[t]['others']:.2f}→{summarize(others[t])}" for t in targets), []))
            where["kept"].append((name, claims[-2]["verdict"]))
            where["recovered"].append((name, claims[-1]["verdict"]))
            curves = [s for s in sweeps if s["size"] == size and s["base_kind"] == kind]
            gain_others, gain_target = [], []
            for curve in curves:
                at = {r["alpha"]: r for r in curve["rows"]}
                if 0.5 in at and 1.0 in at:
                    gain_others.append(at[0.5]["others"] - at[1.0]["others"])
                    gain_target.append(at[0.5]["target"] - at[1.0]["target"])
            parts = [compare(gain_others, 0.0), compare(gain_target, 0.0, tolerance=TOLERANCE)] if gain_others else []
            claims.append(_claim(
                f"Lowering α from 1 to 0.5 raises the other tasks without losing the target ({name})", parts,
                f"over targets, α 1→0.5: others {summarize(gain_others) if gain_others else '-'}, target "
                f"{summarize(gain_target) if gain_target else '-'}", [], "no α sweep with 0.5 and 1"))
            where["sweep"].append((name, claims[-1]["verdict"]))
    titles = {"kept": "LM-Cocktail keeps the target within ε", "recovered": "LM-Cocktail recovers the other tasks",
              "sweep": "The α sweep raises the others before losing the target"}
    for key, title in titles.items():
        verdicts = [v for _, v in where[key]]
        found = [n for n, v in where[key] if v == REPRODUCED] or ["none"]
        claims.append(_claim(f"{title}, along size and regime", verdicts,
                             f"reproduced in: {', '.join(found)}", [], "no cocktail runs"))
    return claims


# -- outputs ----------------------------------------------------------------------------------------

def write_outputs(results: dict, out: Path) -> None:
    """figures, report.md, results.json, verdicts.json in ``out``."""
    figures = plot_scale(results, out)
    sweep_figure = plot_sweeps(results, out / "cocktail-sweeps.png") if results["sweeps"] else None
    verdicts = [{k: c[k] for k in ("claim", "verdict", "line")} for c in results["claims"] + results["cocktail_claims"]]
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=2, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    (out / "report.md").write_text(report_markdown(results, figures, sweep_figure))


def _world_title(results: dict, size: str, kind: str) -> str:
    world = next(w for w in results["worlds"] if w["size"] == size and w["base_kind"] == kind)
    count = world["parameters"]
    amount = f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"
    return f"{size} ({amount} params), {kind} base"


def plot_scale(results: dict, out: Path) -> list[Path]:
    """One figure per split: normalized score vs number of experts, one panel per size (columns)
    and base kind (rows), one line per method (mean ± spread over seeds), multitask dashed."""
    from mergelab.plots import integer_ticks, method_color, save_figure

    config = results["config"]
    sizes, kinds = config["sizes"], config["base_kinds"]
    reference = {(m["size"], m["base_kind"]): m for m in results["multitask"]}
    paths = []
    for split in SPLITS:
        figure, axes = _panels(sizes, kinds)
        for row, kind in enumerate(kinds):
            for column, size in enumerate(sizes):
                axis = axes[row][column]
                ns = sorted({r["n_experts"] for r in results["grid"]})
                for method in config["methods"]:
                    values = [summarize(v for r in results["grid"] if r["size"] == size and r["base_kind"] == kind
                                        and r["method"] == method and r["n_experts"] == n for v in [r[split]])
                              for n in ns]
                    axis.errorbar(ns, [v.mean for v in values], yerr=[v.spread for v in values], marker="o",
                                  capsize=3, label=method, color=method_color(method))
                if (size, kind) in reference:
                    axis.axhline(reference[size, kind][split], color=method_color("multitask"), linestyle="--",
                                 label="multitask")
                axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
                axis.set_title(_world_title(results, size, kind), fontsize=9)
                axis.set_xlabel("number of experts merged")
                axis.set_ylabel(f"normalized {split.replace('_', '-')}")
                axis.grid(alpha=0.3)
                integer_ticks(axis)
                axis.set_xticks(ns)
        axes[0][-1].legend(fontsize=7)
        figure.suptitle(f"Normalized {split.replace('_', '-')} performance vs number of experts (mean ± spread over "
                        f"{len(config['seeds'])} seeds)")
        paths.append(save_figure(figure, out / f"{split.replace('_', '-')}.png"))
    return paths


def _panels(sizes: list[str], kinds: list[str]):
    """(figure, axes[row][column]): one panel per base kind (rows) and size (columns)."""
    from mergelab.plots import new_figure

    figure, _ = new_figure(1, (4.2 * len(sizes), 3.2 * len(kinds)))
    figure.clear()
    return figure, figure.subplots(len(kinds), len(sizes), squeeze=False)


def plot_sweeps(results: dict, path: Path) -> Path:
    """LM-Cocktail's α sweep per size and base kind: target and others vs α, one line per target."""
    from mergelab.plots import save_figure

    config = results["config"]
    sizes, kinds = config["sizes"], config["base_kinds"]
    figure, axes = _panels(sizes, kinds)
    for row, kind in enumerate(kinds):
        for column, size in enumerate(sizes):
            axis = axes[row][column]
            for sweep in (s for s in results["sweeps"] if s["size"] == size and s["base_kind"] == kind):
                alphas = [r["alpha"] for r in sweep["rows"]]
                line, = axis.plot(alphas, [r["target"] for r in sweep["rows"]], marker="o",
                                  label=f"{sweep['target']}: target")
                axis.plot(alphas, [r["others"] for r in sweep["rows"]], marker="s", linestyle="--",
                          color=line.get_color(), label=f"{sweep['target']}: others")
            axis.set_title(_world_title(results, size, kind), fontsize=9)
            axis.set_xlabel("α (weight of the expert)")
            axis.set_ylabel("test score")
            axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return save_figure(figure, path)


def report_markdown(results: dict, figures: list[Path], sweep_figure: Path | None) -> str:
    config = results["config"]
    lines = ["# Scale and regime study", "",
             f"{'Quick smoke run: the numbers mean nothing. ' if config['quick'] else ''}Design: docs/scale-study.md. "
             f"Methods {', '.join(config['methods'])}; n_experts {config['n_experts']}; seeds {config['seeds']}; "
             f"executor {results['executor']}, {results['workers']} workers; {results['seconds']:.0f} s in all, of "
             f"which {results['world_build_seconds']:.0f} s building worlds that were not cached yet.", "",
             "## Verdicts", "", *[c["line"] for c in results["claims"]], "",
             *[c["line"] for c in results["cocktail_claims"]], "",
             "## Every world that was run", "",
             "| world | parameters | cache key | build (s, when first built) | grid (s) | cocktail (s) |",
             "|---|---|---|---|---|---|"]
    for w in results["worlds"]:
        lines.append(f"| {w['name']} | {w['parameters']:,} | {w['key']} | {w['build_seconds']:.0f} | "
                     f"{w.get('grid_seconds', 0):.0f} | {w.get('cocktail_seconds', 0):.0f} |")
    lines += ["", "Settings of every world (`WorldSettings`):", "", "```json",
              *[json.dumps({"name": w["name"], **w["settings"]}) for w in results["worlds"]], "```", "",
              "## Figures", "", *[f"![{p.stem}]({p.name})" for p in figures]]
    if sweep_figure:
        lines += ["", f"![LM-Cocktail α sweeps]({sweep_figure.name})"]
    lines += ["", "## Tables, one per claim", ""]
    for claim in results["claims"]:
        lines += [f"### {claim['claim']}", "", *(claim["table"] or ["(not tested)"]), ""]
    lines += ["### LM-Cocktail per size and base kind (target / others; cocktail: mean ± spread over seeds)", "",
              "| world | target | base | expert | LM-Cocktail |", "|---|---|---|---|---|"]
    for e in results["cocktail_experts"]:
        mine = [r for r in results["cocktail"] if r["size"] == e["size"] and r["base_kind"] == e["base_kind"]
                and r["target"] == e["target"]]
        lines.append(f"| {e['size']} {e['base_kind']} | {e['target']} | {e['base_score']:.2f} / "
                     f"{e['base_others']:.2f} | {e['score']:.2f} / {e['others']:.2f} | "
                     f"{summarize(r['score'] for r in mine)} / {summarize(r['others'] for r in mine)} |")
    return "\n".join(lines) + "\n"
