"""Time the subspace merges (tsv, iso_c, iso_cts) on the 748M Llama benchmark, against TIES, at one thread.

Two modes:

- ``--tensors N``: in this process, on one torch thread, merge N weight matrices of the four
  experts (one of each shape first, then more) with each method and with TIES (density 0.2),
  print CPU seconds per matrix (and wall seconds, which on a shared machine also count other
  processes' turns), and estimate a whole-model merge as Σ over shapes of (matrices of that
  shape × mean CPU seconds) — a quick check that leaves the machine to others.
  ``--check-exact`` also compares the routes with a float64 SVD on the first matrix.
- without ``--tensors``: whole merges through ``mergelab merge --threads 1`` (OMP_NUM_THREADS=1),
  measured as ``bench_methods.py`` measures (own process, waits for idle CPUs, records other
  processes' CPU time, minimum wall time of the quiet runs, maximum peak RSS); writes
  benchmarks/results/subspace_748m.json. Target (issue 14): tsv and iso_c within 5× TIES.

    python benchmarks/make_llama_748m.py
    python benchmarks/bench_subspace.py --tensors 3 [--check-exact] [--only ties iso_c]
    python benchmarks/bench_subspace.py [--only ties iso_c]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import HERE, MODELS  # noqa: E402
from bench_methods import run_configs  # noqa: E402

TIES_DENSITY = 0.2
TARGET_RATIO = 5.0
METHOD_NAMES = ("ties", "tsv", "iso_c", "iso_cts")


def configs(data: Path) -> dict[str, dict]:
    """One whole-model config per method: the 4 experts over the base, float32 arithmetic, bfloat16 out."""
    base = str(data / "base")
    experts = [str(data / m) for m in MODELS]
    ties = {"models": [{"model": m, "parameters": {"weight": 1.0, "density": TIES_DENSITY}} for m in experts]}
    plain = {"models": [{"model": m} for m in experts]}
    return {name: {"merge_method": name, "base_model": base, **(ties if name == "ties" else plain),
                   "dtype": "float32", "out_dtype": "bfloat16"} for name in METHOD_NAMES}


def sample_matrices(data: Path, count: int) -> tuple[list[str], collections.Counter]:
    """``count`` 2-D tensor names, one of each shape first (smallest first); and how many matrices have each shape."""
    from mergelab.io import CheckpointReader

    reader = CheckpointReader(data / "base")
    by_shape: dict[tuple, list[str]] = collections.defaultdict(list)
    for name, info in reader.tensors.items():
        if len(info.shape) == 2:
            by_shape[tuple(info.shape)].append(name)
    reader.close()
    by_size = [by_shape[shape] for shape in sorted(by_shape, key=lambda shape: shape[0] * shape[1])]
    picked, round_index = [], 0
    while len(picked) < count and any(round_index < len(names) for names in by_size):
        for names in by_size:  # the smallest shapes first: a quick run sees the layers, not the embeddings
            if round_index < len(names) and len(picked) < count:
                picked.append(names[round_index])
        round_index += 1
    return picked, collections.Counter({shape: len(names) for shape, names in by_shape.items()})


def method_params(method: str, n_models: int) -> dict:
    """TIES at density 0.2, weight 1; the subspace methods at their registry defaults."""
    return {"weight": [1.0] * n_models, "density": [TIES_DENSITY] * n_models} if method == "ties" else {}


def per_tensor(args) -> None:
    """Time each method on a few matrices and estimate the whole model."""
    from mergelab.io import CheckpointReader
    from mergelab.methods import METHODS
    from mergelab.methods import subspace

    torch.set_num_threads(1)
    names, counts = sample_matrices(args.data, args.tensors)
    readers = [CheckpointReader(args.data / m) for m in ["base", *MODELS]]
    methods = [m for m in METHOD_NAMES if not args.only or m in args.only]
    seconds: dict[str, dict[tuple, list[float]]] = {m: collections.defaultdict(list) for m in methods}
    wall: dict[str, float] = {}
    small = torch.randn(512, 512)  # ≥ fused.MIN_NUMEL entries, so that TIES takes its compiled kernel
    for method in methods:  # warm up: TIES's first call compiles that kernel (seconds)
        METHODS[method]([small + 1, small - 1], small, **method_params(method, 2))
    for name in names:
        base, *experts = (reader.get(name).float() for reader in readers)
        shape = tuple(base.shape)
        for method in methods:
            inputs = [e.clone() for e in experts]
            start, start_cpu = time.perf_counter(), time.process_time()
            METHODS[method](inputs, base, **method_params(method, len(experts)))
            # CPU seconds: on a shared machine the wall clock also counts other processes' turns
            seconds[method][shape].append(time.process_time() - start_cpu)
            wall[method] = time.perf_counter() - start
        print(f"{name} {shape}, CPU s (wall s): "
              + ", ".join(f"{m} {seconds[m][shape][-1]:.2f} ({wall[m]:.1f})" for m in methods), flush=True)
        if args.check_exact and name == names[0]:
            summed = sum(e - base for e in experts)
            u, s, vh = torch.linalg.svd(summed.double(), full_matrices=False)
            exact = s.mean() * u @ vh
            for how in ("svd", "gram"):
                error = float((subspace.isotropic(summed, how).double() - exact).norm() / exact.norm())
                print(f"  iso_c {how} (float32) vs a float64 SVD: relative Frobenius error {error:.2e}", flush=True)
            keep = min(shape) // 4
            u, s, vh = subspace.top_singular(experts[0] - base, keep, "svd")
            for how in ("lowrank", "gram"):
                fu, fs, fvh = subspace.top_singular(experts[0] - base, keep, how)
                error = float(((fu * fs) @ fvh - (u * s) @ vh).norm() / ((u * s) @ vh).norm())
                print(f"  top-{keep} {how} vs svd: relative Frobenius error of the rank-{keep} part {error:.2e}",
                      flush=True)
    for reader in readers:
        reader.close()
    print(f"\nestimated whole-model CPU seconds (one thread; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"2-D matrices only, shapes {dict(counts)}):")
    ties_total = None
    for method in methods:
        measured = {shape: sum(v) / len(v) for shape, v in seconds[method].items()}
        missing = [shape for shape in counts if shape not in measured]
        total = sum(counts[shape] * mean for shape, mean in measured.items())
        ties_total = total if method == "ties" else ties_total
        ratio = f", {total / ties_total:.1f}× TIES" if ties_total else ""
        note = f" (shapes not sampled: {missing})" if missing else ""
        print(f"  {method}: {total:.0f} s{ratio}{note}")


def whole_model(args) -> None:
    run_configs(args, configs(args.data), "s", TARGET_RATIO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data", help="made by make_llama_748m.py")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="configs and merge outputs")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "subspace_748m.json")
    parser.add_argument("--tensors", type=int, default=0,
                        help="time only this many matrices in-process (0: whole merges)")
    parser.add_argument("--check-exact", action="store_true", help="with --tensors: compare the fast routes with SVD")
    parser.add_argument("--repeats", type=int, default=1, help="quiet runs wanted per method")
    parser.add_argument("--max-runs", type=int, default=3, help="most runs per method while waiting for quiet ones")
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for an idle machine per run")
    parser.add_argument("--only", nargs="*", help="only these methods (list ties too, for the ratio)")
    args = parser.parse_args()
    args.data = args.data.resolve()
    if not (args.data / MODELS[-1] / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_llama_748m.py"), str(args.data)], check=True)
    if args.tensors > 0:
        per_tensor(args)
    else:
        whole_model(args)


if __name__ == "__main__":
    main()
