"""What a second thread can buy on this machine: throughput of one thread against two threads
running at once, for three kinds of work a merge does.

- compute: a loop in registers (no memory traffic): 2x when the two CPUs are real cores, about
  1.0-1.3x when they are two hyperthreads of one core;
- memory: a streaming a + b -> c over 256 MB arrays (far beyond the caches), what TIES's passes
  and the float32 conversion are: bounded by the memory bandwidth the VM gets, not the cores;
- page-cache reads: os.preadv of a checkpoint into a reused buffer, what the merge's reads are.

The threads are Python threads running numba loops that release the GIL (and preadv, which
releases it too), as the merge's workers do. Before each case the script waits for the CPUs to
be idle and it records what other processes used meanwhile: only quiet rows mean anything.

    python benchmarks/bench_cores.py [--seconds 3] [--json benchmarks/results/cores.json]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numba
import numpy as np

HERE = Path(__file__).resolve().parent
STREAM = 64 << 20  # float32 entries per array (256 MB)


@numba.njit(nogil=True, cache=True)
def compute(steps):  # an integer hash chain: registers only
    x = np.uint64(1)
    for _ in range(steps):
        x = x * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
        x ^= x >> np.uint64(29)
    return x


@numba.njit(nogil=True, cache=True)
def stream(a, b, c):  # 12 bytes of traffic per entry
    for i in range(a.size):
        c[i] = a[i] + b[i]


def busy_seconds() -> float:
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def run_threads(work, threads: int, seconds: float) -> float:
    """Units of work per second of all threads together (each thread repeats ``work``)."""
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(index):
        while time.perf_counter() < stop:
            done[index] += work(index)

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def kinds(data: Path):
    arrays = [[np.random.default_rng(i).random(STREAM, dtype=np.float32) for _ in range(3)] for i in range(2)]
    steps = 20_000_000
    files = sorted(data.glob("*/*.safetensors"))
    buffers = [np.empty(1 << 28, dtype=np.uint8) for _ in range(2)]  # 256 MB reads
    handles = [os.open(f, os.O_RDONLY) for f in files]
    position = [0, len(handles) // 2]

    def read(index):
        handle = handles[position[index] % len(handles)]
        position[index] += 1
        got = os.preadv(handle, [memoryview(buffers[index])], 0)
        return got / 1e9  # GB

    compute(10)
    stream(*arrays[0])
    return {"compute (Msteps/s)": lambda i: compute(steps) and steps / 1e6,
            "memory a+b->c (GB/s of traffic)": lambda i: stream(*arrays[i]) or STREAM * 12 / 1e9,
            "page-cache pread (GB/s)": read if files else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data", help="checkpoints to read (make_llama_748m.py)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(f"load {os.getloadavg()}, numba {numba.__version__}, {os.cpu_count()} CPUs")
    for kind, work in kinds(args.data).items():
        if work is None:
            continue
        row = {"kind": kind}
        for threads in (1, 2):
            before, own = busy_seconds(), time.process_time()
            start = time.perf_counter()
            rate = run_threads(work, threads, args.seconds)
            wall = time.perf_counter() - start
            others = max(0.0, busy_seconds() - before - (time.process_time() - own))
            row[f"t{threads}"] = round(rate, 2)
            row[f"others_cpu_t{threads}"] = round(others / wall, 2)  # CPUs' worth used by others
        row["t2/t1"] = round(row["t2"] / row["t1"], 2)
        rows.append(row)
        print(row, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
