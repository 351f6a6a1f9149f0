"""Time every merge method of issue 11 on the 748M Llama benchmark, against TIES, at one thread.

Same models, machine checks and measurement as `bench_merge.py` (its own process under
/usr/bin/time -v, waits for idle CPUs, records other processes' CPU time, minimum wall time of
the quiet runs, maximum peak RSS), at one thread: `--threads 1` and OMP_NUM_THREADS=1 (one
torch thread). Every config computes in float32 and writes bfloat16 with
weight 1.0 per expert; the methods that merge any number of models take the 4 experts (with the
base where they use one), nuslerp takes 2, nearswap, arcee_fusion and passthrough 1. Targets
(issue 11): within 2x TIES's wall time and at most 2.5 GB peak RSS.

    python benchmarks/make_llama_748m.py
    python benchmarks/bench_methods.py [--only karcher nuslerp] [--repeats 1]

Writes benchmarks/results/methods_748m.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import HERE, MODELS, git_head, run_meta, timed, warm_cache  # noqa: E402

TIES_DENSITY = 0.2
RSS_TARGET_GB = 2.5


def configs(data: Path) -> dict[str, dict]:
    """One config per method, all with the same dtypes."""
    base = str(data / "base")
    experts = [str(data / m) for m in MODELS]

    def models(count: int, **parameters) -> list[dict]:
        return [{"model": m, "parameters": {"weight": 1.0, **parameters}} for m in experts[:count]]

    sparse = {"density": TIES_DENSITY}
    every = {
        "ties": {"base_model": base, "models": models(4, **sparse)},
        "nuslerp": {"base_model": base, "models": models(2)},
        "multislerp": {"base_model": base, "models": models(4)},
        "karcher": {"models": [{"model": m} for m in experts]},
        "nearswap": {"base_model": base, "models": [{"model": experts[0]}], "parameters": {"t": 0.001}},
        "arcee_fusion": {"base_model": base, "models": [{"model": experts[0]}]},
        "breadcrumbs": {"base_model": base, "models": models(4, **sparse, gamma=0.01)},
        "breadcrumbs_ties": {"base_model": base, "models": models(4, **sparse, gamma=0.01)},
        "della": {"base_model": base, "models": models(4, **sparse, epsilon=0.1)},
        "della_linear": {"base_model": base, "models": models(4, **sparse, epsilon=0.1)},
        "sce": {"base_model": base, "models": [{"model": m} for m in experts],
                "parameters": {"select_topk": TIES_DENSITY}},
        "ram": {"base_model": base, "models": [{"model": m} for m in experts], "parameters": {"epsilon": 1e-3}},
        "ramplus_tl": {"base_model": base, "models": [{"model": m} for m in experts],
                       "parameters": {"epsilon": 1e-3}},
        "passthrough": {"models": [{"model": experts[0], "parameters": {"scale": 0.5}}]},
    }
    return {name: {"merge_method": name, **config, "dtype": "float32", "out_dtype": "bfloat16"}
            for name, config in every.items()}


def run_case(args, name: str, config_path: Path, prefix: str = "m") -> dict:
    out_dir = args.out / f"{prefix}-{name}"
    command = [str(Path(sys.executable).parent / "mergelab"), "merge", str(config_path), str(out_dir),
               "--threads", "1", "--quiet", "--force", "--no-model-card"]
    runs = []
    while sum(r["quiet"] for r in runs) < args.repeats and len(runs) < max(args.repeats, args.max_runs):
        shutil.rmtree(out_dir, ignore_errors=True)
        os.sync()
        run = timed(command, args.max_wait, {"OMP_NUM_THREADS": "1"})  # one torch thread, one tensor at a time
        runs.append(dict(run, quiet=run["others_cpu_s"] <= 0.1 * run["wall_s"] * os.cpu_count()))
        print(f"  {name}: {runs[-1]}", flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"command": command, "commit": git_head(), "runs": runs,
            "wall_s": min(r["wall_s"] for r in runs), "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}


def table(results: dict, ratio_target: float = 2.0) -> str:
    ties = results.get("ties", {}).get("wall_s")
    lines = ["| method | wall s (min) | × TIES | peak RSS GB (max) | runs: wall s (others' CPU s) | "
             f"within {ratio_target:g}× TIES and 2.5 GB |", "|---|---:|---:|---:|---|---|"]
    for name, r in results.items():
        ratio = r["wall_s"] / ties if ties else float("nan")
        met = ratio <= ratio_target and r["peak_rss_gb"] <= RSS_TARGET_GB
        quiet = "" if any(x["quiet"] for x in r["runs"]) else " (no quiet run)"
        walls = ", ".join(f"{x['wall_s']:.1f} ({x['others_cpu_s']:.0f})" for x in r["runs"])
        lines.append(f"| {name} | {r['wall_s']:.1f} | {ratio:.2f} | {r['peak_rss_gb']:.2f} | {walls} | "
                     f"{'yes' if met else '**no**'}{quiet} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data", help="made by make_llama_748m.py")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="configs and merge outputs")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "methods_748m.json")
    parser.add_argument("--repeats", type=int, default=1, help="quiet runs wanted per method")
    parser.add_argument("--max-runs", type=int, default=3, help="most runs per method while waiting for quiet ones")
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for an idle machine per run")
    parser.add_argument("--only", nargs="*", help="run only these methods (list ties too for the reference)")
    args = parser.parse_args()
    args.data = args.data.resolve()
    if not (args.data / MODELS[-1] / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_llama_748m.py"), str(args.data)], check=True)
    run_configs(args, configs(args.data), "m")


def run_configs(args, every: dict[str, dict], prefix: str, ratio_target: float = 2.0) -> None:
    """Run each config (or those in --only) in its own process, print the table, write --results."""
    args.out.mkdir(parents=True, exist_ok=True)
    args.threads, args.mergekit_venv = 1, None  # for run_meta
    warm_cache(args.data)
    stored = json.loads(args.results.read_text()) if args.only and args.results.is_file() else {"results": {}}
    results = stored["results"]
    for name, config in every.items():
        if args.only and name not in args.only:
            continue
        config_path = args.out / f"{prefix}-{name}.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"{name}:", flush=True)
        results[name] = run_case(args, name, config_path, prefix)
    print(table(results, ratio_target))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"meta": run_meta(args), "results": results}, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
