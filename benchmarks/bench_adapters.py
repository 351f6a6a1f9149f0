"""Time adapters on the 748M Llama-shape model: a linear merge of base+adapter for 4 rank-16
LoRA adapters against the full-checkpoint linear merge of the 4 experts (target: within 1.2x),
and extraction of a rank-64 LoRA from one expert (target: <= 60 s on 2 CPU cores). Prints a
markdown table and writes benchmarks/results/adapters_748m.json.

The adapters are written by this script (seeded random factors on every attention and MLP
projection, B scaled so that ΔW is a small change, as a trained LoRA's is) into --out.
Each case runs in its own process under /usr/bin/time -v (bench_merge's `timed`: peak RSS,
how busy the machine was); the minimum wall time of --repeats runs counts.

    python benchmarks/make_llama_748m.py
    python benchmarks/bench_adapters.py [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge import MODELS, git_head, timed, warm_cache  # noqa: E402

RANK, ADAPTERS = 16, 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RATIO_TARGET, EXTRACT_TARGET_S = 1.2, 60.0


def write_adapters(base: Path, out: Path) -> list[Path]:
    """Four seeded rank-16 PEFT LoRA adapters for ``base`` (skipped when already there)."""
    from mergelab.adapters.peft_dir import PREFIX, adapter_config, write_adapter
    from mergelab.io import CheckpointReader

    paths = []
    with CheckpointReader(base) as reader:
        modules = {name.removesuffix(".weight"): info.shape for name, info in reader.tensors.items()
                   if name.endswith(".weight") and name.rsplit(".", 2)[-2] in TARGETS}
        for index in range(ADAPTERS):
            path = out / f"adapter{index + 1}"
            paths.append(path)
            if (path / "adapter_model.safetensors").is_file():
                continue
            generator = torch.Generator().manual_seed(index)
            tensors = {}
            for module, (rows, cols) in sorted(modules.items()):
                tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(RANK, cols, generator=generator) / cols ** 0.5
                tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * 1e-3
            path.mkdir(parents=True, exist_ok=True)
            write_adapter(path, adapter_config(str(base), RANK, 2 * RANK, sorted(set(m.rsplit(".", 1)[-1]
                                                                                      for m in modules))), tensors)
    return paths


def write_configs(data: Path, adapters: list[Path], out: Path) -> dict[str, Path]:
    """bench_merge's linear config (float32 arithmetic, bfloat16 output), on experts and on base+adapter."""
    common = "dtype: float32\nout_dtype: bfloat16\n"
    refs = {"full": [data / m for m in MODELS], "adapter": [f"{data / 'base'}+{a}" for a in adapters]}
    paths = {}
    for name, models in refs.items():
        paths[name] = out / f"linear_{name}.yml"
        paths[name].write_text("merge_method: linear\nmodels:\n" + "".join(
            f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models) + common)
    return paths


def best_of(command: list[str], out_dir: Path, repeats: int, max_wait: float, env: dict) -> dict:
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out_dir, ignore_errors=True)
        os.sync()
        runs.append(timed(command, max_wait, env))
        print(f"  {runs[-1]}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"command": command, "runs": runs, "wall_s": min(r["wall_s"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data", help="made by make_llama_748m.py")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "adapters")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "adapters_748m.json")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="mergelab merge --threads")
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for an idle machine per run")
    parser.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    adapters = write_adapters(args.data / "base", args.out)
    configs = write_configs(args.data, adapters, args.out)
    warm_cache(args.data)
    mergelab = str(Path(sys.executable).parent / "mergelab")
    flags = ["--threads", str(args.threads), "--quiet", "--force"]
    cases = {
        "linear, 4 full experts": [mergelab, "merge", str(configs["full"]), str(args.out / "merged-full")] + flags,
        "linear, 4 x base+adapter (r=16)": [mergelab, "merge", str(configs["adapter"]),
                                           str(args.out / "merged-adapter")] + flags,
        "extract rank 64 from expert1": [mergelab, "adapters", "extract", str(args.data / "expert1"), "--base",
                                         str(args.data / "base"), "--rank", "64", "--out",
                                         str(args.out / "extracted"), "--force", "--quiet"],
    }
    results = {}
    for case, command in cases.items():
        if args.only and not any(o in case for o in args.only):
            continue
        print(case, flush=True)
        out_dir = Path(command[command.index("--out") + 1] if "--out" in command else command[3])
        results[case] = best_of(command, out_dir, args.repeats, args.max_wait, {})
    full, adapter = results.get("linear, 4 full experts"), results.get("linear, 4 x base+adapter (r=16)")
    summary = {}
    if full and adapter:
        summary["adapter_over_full"] = round(adapter["wall_s"] / full["wall_s"], 3)
        summary["adapter_over_full_cpu"] = round(min(r["cpu_s"] for r in adapter["runs"])
                                                 / min(r["cpu_s"] for r in full["runs"]), 3)
        summary["ratio_met"] = summary["adapter_over_full"] <= RATIO_TARGET
    if "extract rank 64 from expert1" in results:
        summary["extract_met"] = results["extract rank 64 from expert1"]["wall_s"] <= EXTRACT_TARGET_S
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_head(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "load1": os.getloadavg()[0],
              "cases": results, "summary": summary}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print("| case | wall s (min) | CPU s (min) | peak RSS GB | target |\n|---|---:|---:|---:|---|")
    targets = {"linear, 4 x base+adapter (r=16)": f"<= {RATIO_TARGET}x full", "extract rank 64 from expert1":
               f"<= {EXTRACT_TARGET_S:g} s"}
    for case, result in results.items():
        cpu = min(r["cpu_s"] for r in result["runs"])
        print(f"| {case} | {result['wall_s']:.1f} | {cpu:.1f} | {result['peak_rss_gb']:.2f} | {targets.get(case, '')} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
