"""Where the cached demo's work goes: each part of `mergelab demo` in this one process (one
worker, one torch thread), timed in CPU seconds (``time.process_time``, meaningful on a busy
machine) and, with ``--profile``, under cProfile (stats written beside the output).

    python benchmarks/profile_demo.py --parts methods cocktail grid sfa digits --out /tmp/profile-demo

Needs the demo world cached (run ``mergelab demo`` once). Writes ``OUT/parts.json`` and, with
``--profile``, ``OUT/<part>.prof`` (read with ``python -m pstats``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import time
from pathlib import Path

PARTS = ("methods", "cocktail", "grid", "sfa", "digits")


def run_part(part: str, world, out: Path) -> None:
    from mergelab.demo import SEEDS, demo_spec, run_spec_here, sfa_lm_spec
    from mergelab.demo.studies import cocktail_study, every_method_study
    from mergelab.experiments import run_grid

    quiet = lambda *_: None  # noqa: E731
    if part == "methods":
        every_method_study(world, out / "methods", quiet, workers=1)
    elif part == "cocktail":
        cocktail_study(world, out / "cocktail", quiet, workers=1, seeds=SEEDS)
    elif part == "grid":
        run_grid(demo_spec(world, n_experts=(2, 4), seeds=SEEDS), out / "grid", workers=1, log=quiet)
    elif part == "sfa":  # one seed with every method (the demo's seed 0)
        run_spec_here(sfa_lm_spec(world, out / "sfa-inputs", seed=0, every_method=True), out / "sfa-lm")
    elif part == "digits":  # one seed of each scenario (the demo runs three)
        from mergelab.studies.digits import run_digits_experiment

        run_digits_experiment(out / "sfa-digits", force=True, quiet=True, workers=1, seeds=(0,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile-demo"))
    parser.add_argument("--profile", action="store_true", help="also write cProfile stats per part")
    args = parser.parse_args()

    from mergelab.demo import QUICK_WORLD  # noqa: F401  (the package, before torch threads are pinned)
    from mergelab.demo.world import WorldSettings, build_world
    from mergelab.devices import torch_threads

    args.out.mkdir(parents=True, exist_ok=True)
    world = build_world(WorldSettings(), log=lambda *_: None)
    if not (world.root / "world.json").is_file():
        raise SystemExit("the demo world is not cached; run `mergelab demo` once")
    results = {"load_before": os.getloadavg(), "parts": {}}
    with torch_threads(1):
        for part in args.parts:
            scratch = args.out / "work" / part
            shutil.rmtree(scratch, ignore_errors=True)
            profiler = cProfile.Profile() if args.profile else None
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler:
                profiler.enable()
            run_part(part, world, scratch)
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.out / f"{part}.prof")
            results["parts"][part] = {"cpu_seconds": round(time.process_time() - cpu, 1),
                                      "wall_seconds": round(time.perf_counter() - wall, 1)}
            print(part, results["parts"][part], flush=True)
    results["load_after"] = os.getloadavg()
    (args.out / "parts.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
