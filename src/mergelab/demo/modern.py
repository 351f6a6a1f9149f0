"""The merging literature since TIES on the demo world: which methods the demo grid can run
(``mergelab grid --demo --methods``), and ``mergelab demo --full``'s extra grid, the seed paper's
four methods beside the modern ones at n ∈ {2, 4, 8} over 3 seeds, with its table and verdicts.

The question the extra grid answers is the one a researcher rerunning "What matters for model
merging at scale" today asks: does a method published since (TSV-M, Iso-C, Iso-CTS, RegMean,
AdaMerging) beat the best of the paper's four, on held-in and on held-out tasks? The verdict
per number of experts is ``evidence.compare`` of the best modern method against the best of the
four (each picked by its mean), so "reproduced" needs a gap larger than the seeds' spread.
"""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path
from typing import Callable

from mergelab.errors import MergelabError
from mergelab.evaluate.evidence import combine, compare, summarize

SEED_FOUR = ("averaging", "task_arithmetic", "ties", "dare_ties")
MODERN = ("tsv", "iso_c", "iso_cts", "regmean", "adamerging")
FULL_N_EXPERTS = (2, 4, 8)
FULL_SEEDS = (0, 1, 2)  # as every LM result of the demo (mergelab.demo.SEEDS)
SPLITS = ("held_in", "held_out")

# The demo grid's own settings of the seed paper's four (density 0.5 as in the papers' sweeps, λ
# picked on the demo world); any other method runs with the demo's parameters (DEMO_PARAMETERS).
GRID_METHODS = {
    "averaging": {"merge_method": "linear"},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5, "lambda": 1.0}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5, "lambda": 1.0, "normalize": True}},
}


def _data_aware() -> dict:
    """The grid's data-aware methods (each picked expert's train split is their data), where the
    grid's experts can carry that split."""
    from mergelab.data_aware import DATA_AWARE
    from mergelab.experiments.spec import ExpertSpec

    return dict(DATA_AWARE) if "train" in ExpertSpec.model_fields else {}


def grid_choices() -> list[str]:
    """Every name ``--methods`` accepts: the demo grid's four, each registry method a grid can
    run over the demo's experts (not the two-endpoint interpolations, not methods that need
    files the grid does not make), the data-aware methods, and the papers' presets."""
    from mergelab.methods import METHODS, PRESETS

    data_aware = _data_aware()
    registry = [name for name, method in METHODS.items()
                if not method.first_model_is_base and method.max_models is None
                and (not method.tensor_files or name in data_aware)]
    extra = [name for name in data_aware if name not in METHODS]
    return list(dict.fromkeys([*GRID_METHODS, *registry, *extra, *PRESETS]))


def grid_methods(names: list[str] | tuple[str, ...]) -> list[dict]:
    """The demo grid's method entries for ``names`` (registry methods, presets, or the grid's
    own ``averaging``), each with the demo's parameters; an unknown or unusable name is refused
    with the list of choices."""
    from mergelab.demo import DEMO_PARAMETERS
    from mergelab.methods import PRESETS

    choices = grid_choices()
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise MergelabError(f"--methods names no method\n  choose from: {', '.join(choices)}")
    for name in names:
        if name not in choices:
            close = difflib.get_close_matches(name, choices, n=1)
            raise MergelabError(f"--methods: '{name}' is not a method the demo grid can run"
                                + (f" (did you mean '{close[0]}'?)" if close else "")
                                + f"\n  choose from: {', '.join(choices)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MergelabError(f"--methods names {', '.join(repeated)} more than once; name each method once")
    entries = []
    for name in names:
        if name in GRID_METHODS:
            entries.append({"name": name, **GRID_METHODS[name]})
        elif name in PRESETS:
            entries.append({"name": name, "preset": name})
        else:
            parameters = DEMO_PARAMETERS.get(name, {})
            entries.append({"name": name, "merge_method": name, **({"parameters": parameters} if parameters else {})})
    return entries


def demo_grid_settings(methods: str | None = None, n_experts: str | None = None, seeds: str | None = None) -> dict:
    """``demo_spec``'s keyword arguments from ``--methods a,b``, ``--n-experts 2,4`` and
    ``--seeds 0,1`` (each optional), every choice checked before the world is built."""
    from mergelab.demo.tasks import WORLD_TASKS
    from mergelab.methods import METHODS, get_preset

    settings: dict = {}
    experts = sum(task.split == "held_in" for task in WORLD_TASKS)
    if n_experts is not None:
        settings["n_experts"] = _numbers(n_experts, "--n-experts", low=1, high=experts,
                                         hint=f"the demo world has {experts} experts")
    if seeds is not None:
        settings["seeds"] = _numbers(seeds, "--seeds", low=0)
    if methods is not None:
        settings["methods"] = [name.strip() for name in methods.split(",") if name.strip()]
        smallest = min(settings.get("n_experts", (2,)))
        for entry in grid_methods(settings["methods"]):
            method = METHODS.get(entry.get("merge_method") or get_preset(entry["preset"]).method)
            low = method.min_models if method else 1  # (a data-aware method outside the registry: any count)
            if smallest < low:
                raise MergelabError(f"--methods: {entry['name']} merges {low} or more experts, but --n-experts asks "
                                    f"for {smallest}; drop it or ask for {low} or more")
    return settings


def _numbers(text: str, option: str, low: int, high: int | None = None, hint: str = "") -> list[int]:
    """Distinct whole numbers from a comma-separated option value, in [low, high]."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MergelabError(f"{option} takes whole numbers separated by commas (e.g. 2,4); got '{text}'") from None
    bad = [n for n in numbers if n < low or (high is not None and n > high)]
    if not numbers or bad or len(set(numbers)) != len(numbers):
        bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise MergelabError(f"{option} takes distinct whole numbers {bounds}; got '{text}'"
                            + (f"\n  {hint}" if hint else ""))
    return numbers


def full_methods() -> tuple[str, ...]:
    """The extra grid's methods: the seed four, then every modern method the grid can run now."""
    choices = grid_choices()
    return SEED_FOUR + tuple(name for name in MODERN if name in choices)


def run_modern_grid(world, out: Path, workers=None, n_experts=FULL_N_EXPERTS, seeds=FULL_SEEDS,
                    log: Callable[[str], None] = lambda *_: None) -> dict:
    """Run the extra grid in ``out`` (from scratch) and return its per-seed values
    (``{method: {n: {split: [one value per seed]}}}``) with the methods and the settings it ran."""
    from mergelab.demo import demo_spec
    from mergelab.experiments import run_grid

    methods = full_methods()
    spec = demo_spec(world, n_experts=n_experts, seeds=seeds, methods=methods)
    shutil.rmtree(out, ignore_errors=True)
    run_grid(spec, out, workers=workers, log=log)
    return modern_results(out, world, methods, n_experts, seeds)


def modern_results(grid_dir: Path, world, methods, n_experts, seeds) -> dict:
    """What the report's section reads from a finished grid over ``methods`` (also one run as
    ``mergelab grid --demo --methods ... --out grid_dir``)."""
    from mergelab.demo import grid_seed_values

    return {"methods": list(methods), "seed_four": [m for m in SEED_FOUR if m in methods],
            "modern": [m for m in methods if m not in SEED_FOUR], "missing": [m for m in MODERN if m not in methods],
            "n_experts": list(n_experts), "seeds": list(seeds), "experts": len(world.experts),
            "values": grid_seed_values(grid_dir, world),
            "multitask": json.loads((grid_dir / "summary.json").read_text()).get("multitask")}


def modern_table(result: dict) -> str:
    """Normalized held-in and held-out per method (rows) and number of experts (columns), mean ±
    spread over the seeds."""
    ns = [str(n) for n in result["n_experts"]]
    values = result["values"]
    header = " | ".join(f"n={n} {label}" for n in ns for label in ("held-in", "held-out"))
    lines = [f"| method | {header} |", "|---|" + "---|" * (2 * len(ns))]
    for method in result["methods"]:
        cells = []
        for n in ns:
            for split in SPLITS:
                seeds = values.get(method, {}).get(n, {}).get(split)
                cells.append(str(summarize(seeds)) if seeds else "-")
        kind = " (seed paper)" if method in result["seed_four"] else ""
        lines.append(f"| {method}{kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best(result: dict, methods: list[str], n: str, split: str) -> tuple[str, list[float]] | None:
    scored = [(m, result["values"][m][n][split]) for m in methods
              if result["values"].get(m, {}).get(n, {}).get(split)]
    return max(scored, key=lambda item: summarize(item[1]).mean) if scored else None


def modern_verdicts(result: dict) -> list[str]:
    """One line per split: does the best modern method beat the best of the seed four, per n
    (``evidence.compare``) and over all n (``evidence.combine``)?"""
    lines = []
    for split, label in (("held_in", "held-in"), ("held_out", "held-out")):
        parts, verdicts = [], []
        for n in map(str, result["n_experts"]):
            modern = _best(result, result["modern"], n, split)
            seed = _best(result, result["seed_four"], n, split)
            if modern is None or seed is None:
                continue
            verdict = compare(modern[1], seed[1])
            verdicts.append(verdict)
            parts.append(f"n={n}: {modern[0]} {summarize(modern[1])} vs {seed[0]} {summarize(seed[1])}, {verdict}")
        lines.append(f"- A modern method beats the best of the seed paper's four on {label} tasks (best of each "
                     f"by its mean; " + ("; ".join(parts) or "nothing to compare") + f"): **{combine(verdicts)}**.")
    return lines


def modern_section(result: dict | None) -> tuple[list[str], list[str]]:
    """The report's "modern methods" table and its verdicts (without ``--full``: where to get them)."""
    if result is None:
        return ([f"The methods published since the seed paper ({', '.join(MODERN)}) beside its four, at n ∈ "
                 f"{{{', '.join(map(str, FULL_N_EXPERTS))}}} over {len(FULL_SEEDS)} seeds: run `mergelab demo --full` "
                 f"(beyond the demo's 10-minute budget)."], [])
    seeds = len(result["seeds"])
    lines = [f"The seed paper's four methods beside the methods published since, on the same grid "
             f"({', '.join(result['methods'])}; n ∈ {{{', '.join(map(str, result['n_experts']))}}}, {seeds} seeds of "
             f"expert picks). Normalized as above; mean ± spread (sample standard deviation) over seeds.", "",
             modern_table(result)]
    every = [n for n in result["n_experts"] if n >= result.get("experts", float("inf"))]
    if every:
        lines += ["", f"At n = {every[0]} every seed picks all {every[0]} experts, so the seeds give the same merge "
                      f"(up to DARE's random masks): a spread of 0 there, and the verdict rests on the gap's sign."]
    if result.get("missing"):
        lines += ["", f"Not in this grid (not available in this build): {', '.join(result['missing'])}."]
    return lines, modern_verdicts(result)
