"""What the scale study (`mergelab study scale`) costs per model size: one world build, one grid
cell and one LM-Cocktail unit, and the full study's time estimated from them.

    python benchmarks/bench_scale_study.py [--sizes small,medium,large] [--cache DIR] [--workers 2]
                                           [--one-step] [--json out.json]

* *world*: ``build_world`` for the plain base kind (0 s when already cached: the cached build time is
  reported beside it);
* *cell*: one grid cell, TIES over 8 experts, merged and scored on its 12 tasks (the largest cell);
* *cocktail*: LM-Cocktail's full recipe on 'add' with 5 examples, scored on every task.

``--one-step`` builds worlds trained for one step each (another cache key): the cell and cocktail
times then need no real world (untrained models generate every allowed token, an upper bound),
which is how the study's budget was planned before the real worlds existed. Each unit runs in
this process on one torch thread, as a study worker does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--cache", default=None, help="World cache (default: $MERGELAB_CACHE or ~/.cache/mergelab).")
    parser.add_argument("--workers", type=int, default=2, help="Workers for the world builds and the estimate.")
    parser.add_argument("--one-step", action="store_true", help="Worlds trained one step per model (timing only).")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from mergelab.demo import demo_spec
    from mergelab.demo.world import WorldSettings, build_world
    from mergelab.devices import torch_threads
    from mergelab.experiments.runner import run_cell
    from mergelab.studies.scale import ScaleConfig, cocktail_with_seed, parameter_count

    config = ScaleConfig()
    quick = dict(base_steps=1, expert_steps=1, multitask_steps=1, instruction_steps=1, light_expert_steps=1)
    rows = []
    for size in args.sizes.split(","):
        settings = WorldSettings(size=size, **(quick if args.one_step else {}))
        tick = time.perf_counter()
        world = build_world(settings, cache=args.cache, workers=args.workers, log=lambda *_: None)
        world_seconds = time.perf_counter() - tick
        spec = demo_spec(world, n_experts=(8,), seeds=(0,))
        cell = {"method": "ties", "n_experts": 8, "seed": 0, "experts": sorted(world.experts)}
        scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        try:
            with torch_threads(1):
                tick = time.perf_counter()
                run_cell(spec.model_dump(), cell, str(scratch / "models"))
                cell_seconds = time.perf_counter() - tick
                tick = time.perf_counter()
                cocktail_with_seed(world, "add", 0, scratch / "cocktail")
                cocktail_seconds = time.perf_counter() - tick
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows.append({"size": size, "parameters": parameter_count(world.base), "world_seconds": world_seconds,
                     "cached_build_seconds": world.build_seconds, "cell_seconds": cell_seconds,
                     "cocktail_seconds": cocktail_seconds, "settings": asdict(settings)})
        print(f"{size:7} {rows[-1]['parameters']:>10,} params  world {world_seconds:7.1f} s (built in "
              f"{world.build_seconds:.0f} s)  cell {cell_seconds:6.1f} s  cocktail {cocktail_seconds:6.1f} s",
              flush=True)
    # per world and base kind: the grid's cells, the cocktail runs, and the sweeps (one cell's worth each)
    units = len(config.methods) * len(config.n_experts) * len(config.seeds)
    cocktails = len(config.cocktail_targets) * len(config.seeds)
    sweeps = len(config.cocktail_targets) * len(config.alphas)
    per_kind = sum(units * r["cell_seconds"] + (cocktails + sweeps + 10) * r["cocktail_seconds"] for r in rows)
    estimate = per_kind * len(config.base_kinds) / args.workers
    load = os.getloadavg()[0]
    print(f"estimated study with worlds cached: {estimate / 60:.0f} min on {args.workers} workers "
          f"(cells counted at the 8-expert cost, an upper bound); load average {load:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "estimate_seconds": estimate, "load": load}, indent=2))


if __name__ == "__main__":
    main()
