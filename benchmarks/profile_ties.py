"""Where one-thread TIES spends its time on the 748M models: each phase of the engine's path
(read, bfloat16 -> float32, the compiled passes, cast, write) timed on a few real tensors, in
this thread's CPU seconds (steadier than wall time on a shared machine), against the floor's
phases on the same tensors (read, convert, sum, cast).

    python benchmarks/profile_ties.py [--layers 1] [--embed]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from mergelab.engine import Workspace
from mergelab.io import CheckpointReader
from mergelab.methods import fused

HERE = Path(__file__).resolve().parent
MODELS = ["base", "expert1", "expert2", "expert3", "expert4"]


class Clock:
    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def __call__(self, phase, fn, *args):
        c, w = time.thread_time(), time.perf_counter()
        out = fn(*args)
        self.cpu[phase] = self.cpu.get(phase, 0.0) + time.thread_time() - c
        self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - w
        return out

    def report(self, title):
        total = sum(self.cpu.values())
        print(f"{title}: {total:.2f} CPU s ({sum(self.wall.values()):.2f} wall s)")
        for phase, cpu in self.cpu.items():
            print(f"  {phase:28s} {cpu:6.2f} CPU s {cpu / total:6.1%}   wall {self.wall[phase]:6.2f}")
        return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers to profile")
    parser.add_argument("--embed", action="store_true", help="the embedding too (65.5M entries)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    readers = [CheckpointReader(args.data / m) for m in MODELS]
    names = [n for n in readers[0].tensors if any(f"layers.{i}." in n for i in range(args.layers))
             and n.endswith("proj.weight")]
    if args.embed:
        names.insert(0, "model.embed_tokens.weight")
    entries = sum(int(np.prod(readers[0].tensors[n].shape)) for n in names)
    print(f"{len(names)} tensors, {entries / 1e6:.0f}M entries per model; load {os.getloadavg()[0]:.1f}")
    out_fd = os.open("/tmp/profile_ties.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    weight, density = [1.0] * 4, [0.2] * 4
    module = fused.compiled("_fused_kernels")
    phase_of = {"sample_magnitudes": "guess: sample", "delta_histogram": "pass 1: delta + histogram",
                "bucket_values": "pass 2: bucket values", "kth_in_bucket": "threshold in its bucket",
                "combine": "pass 3: combine", "combine_equal_mean": "pass 3: combine"}
    kernels = {name: getattr(module, name) for name in phase_of if hasattr(module, name)}
    phases = list(dict.fromkeys(phase_of[name] for name in kernels))
    workspace = Workspace()  # reused, as each engine worker's (run 0 also pays its first page faults)
    for repeat in range(args.repeats):
        ties, floor = Clock(), Clock()
        for name, kernel in kernels.items():  # fused.ties looks its loops up on the module at each call
            setattr(module, name, (lambda phase, k: lambda *a: ties(phase, k, *a))(phase_of[name], kernel))
        for name in names:
            tensors = []
            for slot, reader in enumerate(readers):
                tensors.append(ties("read + bf16->f32", workspace.load, reader, name, slot, torch.float32,
                                    torch.device("cpu")))
            base, experts = tensors[0], tensors[1:]
            merged = ties("ties (python glue)", fused.ties, experts, base, weight, density, True, 1.0, True)
            out = ties("cast bf16", merged.to, torch.bfloat16)
            ties("finite check", lambda: bool(torch.isfinite(merged.sum())))
            data = out.reshape(-1).view(torch.uint8).numpy()
            ties("write", os.pwrite, out_fd, data, 0)
        for name in names:  # the floor on the same tensors
            total = None
            for slot, reader in enumerate(readers[1:]):
                raw = floor("read (pread)", reader.get, name, workspace.raw)
                converted = floor("bf16->f32", workspace.slots[slot][:raw.numel() * 4].view(torch.float32)
                                  .view(raw.shape).copy_, raw)
                if total is None:
                    total = converted
                else:
                    floor("sum", total.add_, converted)
            out = floor("cast bf16", total.to, torch.bfloat16)
            data = out.reshape(-1).view(torch.uint8).numpy()
            floor("write", os.pwrite, out_fd, data, 0)
        for clock in (ties.cpu, ties.wall):  # the glue's time holds the kernels' own
            clock["ties (python glue)"] -= sum(clock[p] for p in phases if p in clock)
        t = ties.report(f"run {repeat}: TIES")
        f = floor.report(f"run {repeat}: floor")
        print(f"  TIES / floor (CPU): {t / f:.2f}")
    os.close(out_fd)


if __name__ == "__main__":
    main()
