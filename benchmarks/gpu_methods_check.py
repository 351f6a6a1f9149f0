"""Every registered merge method on the CPU and on ``--device``, compared tensor by tensor.

The demo world's base and three experts (``--world``: a built world's directory; default: build
or reuse the demo world), each expert's Fisher and RegMean Grams computed first on the CPU,
then one merge per method with the demo's parameters (``mergelab.demo.demo_configs``) on each
device. A method is ``equal`` when every output tensor is bit for bit the CPU's, ``close`` when
the largest difference is within float32 rounding of the tensor's scale, and ``failed`` when
the merge on the device raised (the error is kept). Part of the GPU check
(``benchmarks/gpu_check.sh``); on a machine without CUDA, ``--device cpu`` checks the script.

    python benchmarks/gpu_methods_check.py --device cuda --json benchmarks/results/gpu_methods.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})
    return found


def compare(cpu_dir: Path, other_dir: Path) -> dict:
    cpu, other = tensors(cpu_dir), tensors(other_dir)
    if set(cpu) != set(other):
        return {"verdict": "different tensors", "missing": sorted(set(cpu) ^ set(other))[:5]}
    differing, worst, worst_relative, entries, total = [], 0.0, 0.0, 0, 0
    for name, a in cpu.items():
        total += a.numel()
        b = other[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            return {"verdict": "different dtype or shape", "tensor": name}
        if not torch.equal(a, b):
            differing.append(name)
            entries += int((a != b).sum())
            gap = float((a.double() - b.double()).abs().max())
            worst = max(worst, gap)
            worst_relative = max(worst_relative, gap / max(float(a.double().abs().max()), 1e-30))
    verdict = "equal" if not differing else "close" if worst_relative <= 1e-5 else "differs"
    return {"verdict": verdict, "tensors": len(cpu), "differing_tensors": len(differing),
            "differing_entries": entries, "entries": total,
            "max_abs_diff": worst, "max_relative_diff": worst_relative, "first": differing[:3]}


def main() -> None:
    import mergelab
    from mergelab.demo import demo_configs
    from mergelab.demo.studies import COCKTAIL_TARGETS, STATISTICS
    from mergelab.demo.world import World, WorldSettings, build_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--world", type=Path, help="a built world's directory (default: the demo world)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_methods"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", help="these methods only")
    args = parser.parse_args()

    world = World(args.world.resolve(), WorldSettings()) if args.world else build_world(WorldSettings())
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    experts = {task: world.experts[task] for task in COCKTAIL_TARGETS}
    files = {kind: {task: make(world, task, path, args.out / kind / f"{task}.safetensors")
                    for task, path in experts.items()} for kind, make in STATISTICS.items()}
    configs = demo_configs({"base": world.base, **experts}, files, list(experts))
    report = {"device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None, "methods": {}}
    for method, config in configs.items():
        if args.only and method not in args.only:
            continue
        entry, seconds = {}, {}
        try:
            for device in ("cpu", args.device):
                tick = time.perf_counter()
                mergelab.merge(config, args.out / f"{method}-{device}", device=device, quiet=True, seed=0,
                               force=True)
                seconds[device] = round(time.perf_counter() - tick, 3)
            entry = compare(args.out / f"{method}-cpu", args.out / f"{method}-{args.device}")
        except Exception as error:  # noqa: BLE001 - the point is to record every failure and go on
            entry = {"verdict": "failed", "error": f"{type(error).__name__}: {error}",
                     "where": traceback.format_exc().strip().splitlines()[-3:]}
        entry["seconds"] = seconds
        report["methods"][method] = entry
        print(f"{method:18s} {entry['verdict']:10s} {json.dumps({k: v for k, v in entry.items() if k != 'verdict'})}",
              flush=True)
        for device in ("cpu", args.device):
            shutil.rmtree(args.out / f"{method}-{device}", ignore_errors=True)
    verdicts = [entry["verdict"] for entry in report["methods"].values()]
    report["summary"] = {verdict: verdicts.count(verdict) for verdict in sorted(set(verdicts))}
    print("summary:", report["summary"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
