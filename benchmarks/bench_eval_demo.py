"""The evaluator on the cached demo world: CPU seconds per model and the predictions, before
(``decoder.py`` at a git revision, batch 64: what the demo used) and now (several batch sizes).

Predictions are each rank-classification example's chosen option and each generation task's
greedy text; a speed-up must leave every one of them unchanged.

    python benchmarks/bench_eval_demo.py --before 8877220 --batch 64 256 1024 [--models DIR ...]

Without ``--models`` it takes every model of the demo world (run ``mergelab demo`` once first).
Writes ``benchmarks/results/eval_demo.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def decoder_at(revision: str):
    """``mergelab.evaluate.decoder`` as it was at ``revision`` (a module of its own)."""
    source = subprocess.run(["git", "show", f"{revision}:src/mergelab/evaluate/decoder.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "decoder_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decoder_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def predictions(decoder, model, tokenizer, tasks, batch_size: int) -> dict[str, list]:
    chosen = {}
    for task in tasks:
        if task.kind == "rank_classification":
            scores = decoder.rank_choices(model, tokenizer, task.examples, batch_size=batch_size)
            chosen[task.name] = [max(range(len(s)), key=s.__getitem__) for s in scores]
        else:
            chosen[task.name] = decoder.generate(model, tokenizer, [e["input"] for e in task.examples],
                                                 batch_size=batch_size, max_new_tokens=8, stop=["\n"])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="8877220", help="git revision of the old evaluator")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args()

    import torch

    from mergelab.demo.world import WorldSettings, build_world, world_models
    from mergelab.evaluate import decoder as now
    from mergelab.loading import load_model

    torch.set_num_threads(1)
    world = build_world(WorldSettings(), log=lambda *_: None)
    tasks = world.tasks("test")
    before = decoder_at(args.before)
    models = args.models or [str(path) for path in world_models(world).values()]
    rows, differing = [], 0
    load = os.getloadavg()
    for model_dir in models:
        model, tokenizer = load_model(model_dir, "causal")
        model.eval()
        tick = time.process_time()
        reference = predictions(before, model, tokenizer, tasks, 64)
        row = {"model": Path(model_dir).name, "before_cpu_s": round(time.process_time() - tick, 2), "now": {}}
        for batch in args.batch:
            tick = time.process_time()
            got = predictions(now, model, tokenizer, tasks, batch)
            changed = {task: sum(a != b for a, b in zip(reference[task], got[task]))
                       for task in reference if reference[task] != got[task]}
            differing += bool(changed)
            row["now"][batch] = {"cpu_s": round(time.process_time() - tick, 2), "changed": changed}
        rows.append(row)
        print(row, flush=True)
    print("every prediction equal" if not differing else f"{differing} model/batch pairs differ")
    target = ROOT / "benchmarks" / "results" / "eval_demo.json"
    target.write_text(json.dumps({"before": args.before, "load_before": load, "load_after": os.getloadavg(),
                                  "rows": rows, "equal": not differing}, indent=2) + "\n")


if __name__ == "__main__":
    main()
