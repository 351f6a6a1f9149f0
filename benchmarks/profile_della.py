"""Where DELLA's time goes on one tensor: 4 experts' 5632×2048 float32 MLP weight over a base
(bfloat16 values, as the 748M benchmark's checkpoints), one torch thread.

    python benchmarks/profile_della.py [--repeats 3]

Prints the thread CPU seconds of each phase of the torch kernel (τ, the random draws, the per-row
ranking, the sign consensus or the sum), then the whole merge as dispatched (compiled when numba
is installed: ``sparsify.della_merge``) for TIES, della and della_linear, and DELLA's torch kernel.
CPU seconds are the ones to compare on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mergelab.methods import METHODS, fused
from mergelab.methods.sparsify import _rank_order, dare_uniform
from mergelab.methods.task_arithmetic import _plain_sum, _sign_consensus

SHAPE = (5632, 2048)
KEY = "model.layers.0.mlp.up_proj.weight"


def cpu(function, repeats: int):
    """(min thread CPU seconds, last result) of ``function()`` over ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.thread_time()
        result = function()
        best = min(best, time.thread_time() - start)
    return best, result


def phases(experts, base, repeats: int) -> dict[str, float]:
    """The torch path's phases for one expert (density 0.2, ε 0.1), then the combine of four."""
    deltas = [e.clone().sub_(base) for e in experts]
    times = {"tau (sub)": cpu(lambda: experts[0].clone().sub_(base), repeats)[0] - cpu(experts[0].clone, repeats)[0]}
    times["draws (dare_uniform)"], draws = cpu(lambda: dare_uniform(SHAPE, 0, 0, KEY), repeats)
    times["rank (argsort of one row block)"], _ = cpu(lambda: _rank_order(deltas[0]), 1)
    times["sign consensus (4 experts)"], _ = cpu(lambda: _sign_consensus([d.clone() for d in deltas], [1.0] * 4, True),
                                                 repeats)
    times["plain sum (4 experts)"], _ = cpu(lambda: _plain_sum([d.clone() for d in deltas], [1.0] * 4, False), repeats)
    times["clone of 4 experts (subtract from the two above)"], _ = cpu(lambda: [d.clone() for d in deltas], repeats)
    return times


def merged(name: str, experts, base, repeats: int, **params) -> float:
    best = float("inf")
    for _ in range(repeats):
        inputs, base_copy = [e.clone() for e in experts], base.clone()
        start = time.thread_time()
        METHODS[name](inputs, base_copy, **params)
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(SHAPE, generator=generator) * 0.02).bfloat16().float()
    experts = [(base + torch.randn(SHAPE, generator=generator) * 2e-3).bfloat16().float() for _ in range(4)]
    print(f"load average {os.getloadavg()[0]:.2f}; 4 experts of {SHAPE[0]}x{SHAPE[1]} float32, thread CPU s")
    for phase, seconds in phases(experts, base, args.repeats).items():
        print(f"  {phase:50s} {seconds:.3f}")
    common = {"weight": [1.0] * 4, "density": [0.2] * 4}
    della = {"epsilon": [0.1] * 4, "seed": 0, "key": KEY}
    ties = merged("ties", experts, base, args.repeats, **common)
    print(f"whole merge: ties {ties:.3f}")
    for name in ("della", "della_linear"):
        seconds = merged(name, experts, base, args.repeats, **common, **della)
        minimum = fused.MIN_NUMEL
        fused.MIN_NUMEL = 1 << 62  # the torch kernel (compiled_topk's radix ranks where numba is)
        torch_seconds = merged(name, experts, base, 1, **common, **della)
        fused.MIN_NUMEL = minimum
        print(f"whole merge: {name} {seconds:.3f} ({seconds / ties:.2f}x TIES); torch kernel {torch_seconds:.3f}")


if __name__ == "__main__":
    main()
