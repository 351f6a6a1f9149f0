"""`mergelab demo` wall time, from nothing and with the world cached, for several --workers.

Each run is the CLI in its own process: its wall time, the CPU time of it and its workers, and
the load average before and after (numbers taken while other work runs are inflated). The
first run for a worker count builds the world in a fresh cache; the second reuses it. The
demo's own per-part seconds (results.json) are kept beside each run.

    python benchmarks/bench_demo.py                       # workers 1 and 2, full demo: ~30 min
    python benchmarks/bench_demo.py --workers 2 --quick   # a check that the script works

Writes benchmarks/results/demo_<full|quick>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGELAB = ROOT / ".venv" / "bin" / "mergelab"


def run_demo(out: Path, cache: Path, workers: int, quick: bool) -> dict:
    command = [str(MERGELAB) if MERGELAB.exists() else "mergelab", "demo", "--out", str(out), "--quiet",
               "--workers", str(workers), *(["--quick"] if quick else [])]
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "MERGELAB_CACHE": str(cache)})
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the demo and its workers, once reaped
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    parts = json.loads((out / "results.json").read_text())["seconds"]
    return {"workers": workers, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "load_before": load_before, "load_after": os.getloadavg(),
            "parts": {k: round(v, 1) for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="the --quick demo (checks the script, measures little)")
    args = parser.parse_args()
    runs = []
    for workers in args.workers:
        scratch = Path(tempfile.mkdtemp(prefix="bench-demo-"))
        try:
            for state in ("from nothing", "world cached"):
                run = run_demo(scratch / "out", scratch / "cache", workers, args.quick)
                runs.append({"state": state, **run})
                print(f"workers {workers}, {state}: {run['seconds']:.0f} s, {run['cpu_seconds']:.0f} s of CPU "
                      f"(load {run['load_before'][0]:.1f} before, "
                      f"{run['load_after'][0]:.1f} after); parts {run['parts']}", flush=True)
                shutil.rmtree(scratch / "out")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    target = ROOT / "benchmarks" / "results" / f"demo_{'quick' if args.quick else 'full'}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                                  "runs": runs}, indent=2) + "\n")
    print(f"written to {target}")


if __name__ == "__main__":
    main()
