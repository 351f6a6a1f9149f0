"""Time SCE against TIES on one tensor: 4 experts' 5632×2048 float32 MLP weight over a base
(the 748M benchmark's largest per-layer shape), one torch thread, inputs copied before each call.

    python benchmarks/bench_sce_tensor.py [--repeats 5]

Prints, per method, the minimum wall and CPU seconds of the repeats: TIES (compiled when numba
is installed), SCE on its compiled loops and on the torch kernel (select_topk 0.2 and 1.0), and
whether the two SCE kernels agree bit for bit; then Breadcrumbs and DELLA (density 0.2) as merged
by default. CPU seconds are the ones to compare on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mergelab.methods import METHODS, compiled_topk



def timed(name: str, experts: list[torch.Tensor], base: torch.Tensor, repeats: int, **params):
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        inputs, base_copy = [e.clone() for e in experts], base.clone()
        wall, cpu = time.perf_counter(), time.process_time()
        out = METHODS[name](inputs, base_copy, **params)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    shape = (5632, 2048)
    base = (torch.randn(shape, generator=generator) * 0.02).bfloat16().float()  # the checkpoints are bfloat16
    experts = [(base + torch.randn(shape, generator=generator) * 1e-3).bfloat16().float() for _ in range(4)]
    print(f"load average {os.getloadavg()[0]:.2f}; 4 experts of {shape[0]}x{shape[1]} float32, one thread")
    ties_wall, ties_cpu, _ = timed("ties", experts, base, args.repeats, weight=[1.0] * 4, density=[0.2] * 4)
    print(f"ties (density 0.2): {ties_wall:.3f} s wall, {ties_cpu:.3f} s CPU")
    for select_topk in (0.2, 1.0):
        wall, cpu, compiled = timed("sce", experts, base, args.repeats, select_topk=select_topk)
        minimum = compiled_topk.MIN_NUMEL
        compiled_topk.MIN_NUMEL = 1 << 62  # the torch kernel
        torch_wall, torch_cpu, reference = timed("sce", experts, base, args.repeats, select_topk=select_topk)
        compiled_topk.MIN_NUMEL = minimum
        print(f"sce select_topk {select_topk}: compiled {wall:.3f} s wall, {cpu:.3f} s CPU "
              f"({cpu / ties_cpu:.2f}x TIES CPU); torch {torch_wall:.3f} s wall, {torch_cpu:.3f} s CPU; "
              f"identical: {torch.equal(compiled, reference)}")
    sparse = {"weight": [1.0] * 4, "density": [0.2] * 4}
    della = {"epsilon": [0.1] * 4, "seed": 0, "key": "model.layers.0.mlp.up_proj.weight"}
    for name, params in [("breadcrumbs", {"gamma": [0.01] * 4}), ("breadcrumbs_ties", {"gamma": [0.01] * 4}),
                         ("della", della), ("della_linear", della)]:
        wall, cpu, _ = timed(name, experts, base, args.repeats, **sparse, **params)
        print(f"{name} (gamma 0.01 / epsilon 0.1): {wall:.3f} s wall, {cpu:.3f} s CPU ({cpu / ties_cpu:.2f}x TIES CPU)")


if __name__ == "__main__":
    main()
