"""Time RegMean's per-matrix solve on the 748M Llama benchmark's shapes, against TIES, at one thread.

For each weight shape of ``make_llama_748m.py`` (q/k/v/o 2048×2048, gate/up 5632×2048, down
2048×5632) and 4 experts: random weights, random positive semi-definite Grams X_iᵀX_i
(X_i: 512 tokens), then CPU seconds of ``METHODS["regmean"]`` (alpha 0.9) and of TIES (density
0.2) on the same tensors, and the per-model estimate Σ over shapes of (matrices × seconds):
12 blocks × (4 square, 2 wide, 1 tall). Embeddings and norms (averaged) are left out.

    OMP_NUM_THREADS=1 python benchmarks/bench_regmean.py [--experts 4]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mergelab.methods import METHODS

SHAPES = {(2048, 2048): 4 * 12, (5632, 2048): 2 * 12, (2048, 5632): 1 * 12}  # (out, in): matrices in the model


def cpu_seconds(run) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    totals = {"regmean": 0.0, "ties": 0.0}
    print(f"load: {os.getloadavg()[0]:.1f}; {args.experts} experts, one thread")
    for (rows, columns), count in SHAPES.items():
        base = torch.randn(rows, columns, generator=generator) * 0.02
        experts = [base + torch.randn(rows, columns, generator=generator) * 1e-3 for _ in range(args.experts)]
        grams = []
        for _ in range(args.experts):
            tokens = torch.randn(512, columns, generator=generator)
            grams.append(tokens.T @ tokens)
        seconds = {
            "regmean": cpu_seconds(lambda: METHODS["regmean"]([e.clone() for e in experts], None, gram=grams,
                                                               alpha=0.9)),
            "ties": cpu_seconds(lambda: METHODS["ties"]([e.clone() for e in experts], base, weight=[1.0] * len(experts),
                                                        density=[0.2] * len(experts))),
        }
        for name, value in seconds.items():
            totals[name] += value * count
        print(f"{rows}x{columns}: regmean {seconds['regmean']:.2f} s, ties {seconds['ties']:.2f} s per matrix "
              f"({count} in the model)")
    print(f"estimate for the model's linear weights: regmean {totals['regmean']:.0f} s, ties {totals['ties']:.0f} s "
          f"({totals['regmean'] / totals['ties']:.1f}x)")


if __name__ == "__main__":
    main()
