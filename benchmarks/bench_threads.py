"""Torch threads and the OpenMP wait policy on small models, with and without a busy neighbour.

    python benchmarks/bench_threads.py [--sizes 5M 27M 110M] [--repeats 20] [--json results/threads.json]

Each case runs in a fresh process (``OMP_WAIT_POLICY`` is read when torch loads its OpenMP
runtime, so it cannot change inside one process): model size × torch threads (1, 2) × wait
policy (libgomp's default, PASSIVE) × neighbour (none, one CPU-bound process spinning beside
it). A case times the median of ``--repeats`` forward passes of a Llama on the few-shot batch
of ``bench_cocktail.py`` (5 examples of ~41 tokens, no grad), and a merge-like elementwise
pass over 16M-entry float32 tensors (``a.mul_(w).add_(b)``), which is what a merge does per
tensor. The findings behind ``mergelab.threads`` come from this table.

The neighbour is a pure-Python busy loop: it holds one core, like another training run or
another merge would. Record ``uptime`` with the numbers: other work on the machine is a
neighbour too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # name -> (hidden, layers, intermediate, vocab); parameters counted at run time
    "5M": (256, 4, 688, 8000),
    "27M": (512, 6, 1376, 8000),
    "110M": (768, 12, 2048, 32000),
    "350M": (1024, 20, 2816, 32000),
}


def case(size: str, threads: int, repeats: int) -> dict:
    """One case, in this process: the median forward time and the median elementwise pass time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    hidden, layers, intermediate, vocab = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         intermediate_size=intermediate, tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(4, vocab, (5, 41))
    forward = []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up: first-call allocations and kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            forward.append(time.perf_counter() - start)
    a, b = torch.randn(16 * 2**20), torch.randn(16 * 2**20)
    elementwise = []
    for _ in range(max(3, repeats // 4)):
        start = time.perf_counter()
        a.mul_(0.5).add_(b)
        elementwise.append(time.perf_counter() - start)
    return {"params": params, "forward_ms": 1000 * sorted(forward)[len(forward) // 2],
            "elementwise_ms": 1000 * sorted(elementwise)[len(elementwise) // 2]}


def run_case(size: str, threads: int, passive: bool, hog: bool, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    try:
        done = subprocess.run([sys.executable, __file__, "--case", size, str(threads), str(repeats)], env=env,
                              capture_output=True, text=True, check=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["5M", "27M", "110M"], choices=list(SIZES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--case", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        size, threads, repeats = args.case
        print(json.dumps(case(size, int(threads), int(repeats))))
        return
    print(f"{os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}, load {os.getloadavg()}")
    rows = []
    print(f"{'model':>6} {'params':>7} {'threads':>7} {'policy':>8} {'neighbour':>9} {'forward ms':>10} "
          f"{'16M axpy ms':>11}")
    for size in args.sizes:
        for hog in (False, True):
            for passive in (False, True):
                for threads in args.threads:
                    load = os.getloadavg()[0]
                    row = {"size": size, "threads": threads, "policy": "PASSIVE" if passive else "default",
                           "neighbour": hog, "load1_before": load,
                           **run_case(size, threads, passive, hog, args.repeats)}
                    rows.append(row)
                    print(f"{size:>6} {row['params'] / 1e6:6.1f}M {threads:>7} {row['policy']:>8} "
                          f"{'busy' if hog else '-':>9} {row['forward_ms']:10.1f} {row['elementwise_ms']:11.1f}",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
