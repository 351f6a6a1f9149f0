"""Time `mergelab merge` (linear, TIES) on the 748M Llama-shape models, against the I/O floor,
at one and two threads, within a memory budget, as Ray tasks, and optionally mergekit; print
markdown tables (every case, and the issue's targets) and write benchmarks/results/merge_748m.json.

Each case runs in its own process under /usr/bin/time -v, so the peak RSS is that process'
own. Other work on the machine is measured, not assumed away: before each run the script
waits (up to --max-wait) for the CPUs to be idle, and it records the CPU seconds other
processes used during the run; a run is "quiet" when that is under 10% of the machine. Each
case runs until --repeats runs were quiet (at most --max-runs); the minimum wall time counts.
Inputs are read once beforehand so that they are in the page cache.

"t1" cases run one worker thread on one torch thread (OMP_NUM_THREADS=1), the floor too;
"t2" cases run `--threads 2` (torch's threads shared between the two workers); the
"torch2" case is one worker thread on torch's default threads (both cores). The Ray cases
start a local Ray instance inside `mergelab merge` (one task per CPU, twice over) and their
output is compared byte for byte with the local t2 output.

    python benchmarks/make_llama_748m.py
    python benchmarks/bench_merge.py [--repeats 2] [--only ties] [--device cuda] [--mergekit-venv /work/mk-venv]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
MODELS = ["expert1", "expert2", "expert3", "expert4"]
TARGETS = {"mergelab linear t1": (16.0, 2.5), "mergelab ties t1": (46.0, 2.5)}  # (wall s, peak RSS GB)
RSS_TARGET_GB = 2.5
DENSITY = 0.2
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def write_configs(data: Path, out: Path) -> dict[str, Path]:
    """The same YAML for mergelab and mergekit: float32 arithmetic, bfloat16 output."""
    common = "dtype: float32\nout_dtype: bfloat16\n"
    linear = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {data / m}\n    parameters: {{weight: 1.0}}\n" for m in MODELS)
    ties = f"merge_method: ties\nbase_model: {data / 'base'}\nmodels:\n" + "".join(
        f"  - model: {data / m}\n    parameters: {{weight: 1.0, density: {DENSITY}}}\n" for m in MODELS)
    paths = {}
    for name, text in [("linear", linear + common), ("ties", ties + common)]:
        paths[name] = out / f"{name}.yml"
        paths[name].write_text(text)
    return paths


def cases(args, configs: dict[str, Path], out: Path) -> dict[str, tuple[list[str], Path, dict[str, str]]]:
    """(command line, output directory, environment) keyed by case name."""
    models = [str(args.data / m) for m in MODELS]
    mergelab = [str(Path(sys.executable).parent / "mergelab"), "merge"]
    common = ["--quiet", "--force", "--no-model-card"] + (["--device", args.device] if args.device != "cpu" else [])

    def merge(method: str, tag: str, *flags: str) -> tuple[list[str], Path]:
        return mergelab + [str(configs[method]), str(out / f"ml-{method}-{tag}")] + common + list(flags), \
            out / f"ml-{method}-{tag}"

    runs = {"floor (read+f32+sum+write) t1": ([sys.executable, str(HERE / "floor.py"), str(out / "floor")] + models,
                                              out / "floor", {**ONE_THREAD, "THP_MEM_ALLOC_ENABLE": "1"})}
    for method in ("linear", "ties"):
        runs[f"mergelab {method} t1"] = (*merge(method, "t1", "--threads", "1"), ONE_THREAD)
        if method == "ties":  # one worker on torch's default threads: what --threads 1 used to mean
            runs["mergelab ties t1 torch2"] = (*merge(method, "t1-torch2", "--threads", "1"), {})
        runs[f"mergelab {method} t2"] = (*merge(method, "t2", "--threads", "2"), {})
        runs[f"mergelab {method} t2 1.5GB"] = (*merge(method, "t2-1.5GB", "--threads", "2", "--max-memory", "1.5GB"),
                                              {})
        if not args.no_ray and args.device == "cpu":
            runs[f"mergelab {method} ray"] = (*merge(method, "ray", "--executor", "ray"), {})
    if args.mergekit_venv:
        mergekit = [str(args.mergekit_venv / "bin" / "mergekit-yaml")]
        flags = ["--lazy-unpickle", "--quiet", "--no-write-model-card", "--no-copy-tokenizer"]
        for method in ("linear", "ties"):
            runs[f"mergekit {method}"] = (mergekit + [str(configs[method]), str(out / f"mk-{method}")] + flags,
                                          out / f"mk-{method}", {})
    return {k: v for k, v in runs.items() if not args.only or any(o in k for o in args.only)}


def digest(out_dir: Path) -> dict[str, str]:
    """sha256 of every output shard and the index: to compare two outputs byte for byte."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out_dir.iterdir()) if path.suffix in (".safetensors", ".json")}


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all users)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def wait_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until the machine is under ``threshold`` busy over 3 s; return that."""
    deadline = time.monotonic() + max_wait
    while True:
        before = busy_seconds()
        time.sleep(3)
        busy = (busy_seconds() - before) / (3 * os.cpu_count())
        if busy < threshold or time.monotonic() > deadline:
            return round(busy, 3)


def timed(command: list[str], max_wait: float, env: dict[str, str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds and peak RSS (GB) of that process, how busy the
    machine was just before (load average, CPU fraction) and the CPU seconds others used meanwhile."""
    idle = {"load1_before": os.getloadavg()[0], "busy_before": wait_idle(max_wait)}
    busy, start = busy_seconds(), time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v"] + command, capture_output=True, text=True, env={**os.environ, **env})
    wall, busy = time.perf_counter() - start, busy_seconds() - busy
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    stat = {key: float(re.search(rf"{key} \(\w+\): ([\d.]+)", done.stderr).group(1))
            for key in ("User time", "System time", "Maximum resident set size")}
    own = stat["User time"] + stat["System time"]
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(stat["Maximum resident set size"] * 1024 / 1e9, 3),
            "cpu_s": round(own, 1), "others_cpu_s": round(max(0.0, busy - own), 1), **idle}


def warm_cache(data: Path) -> None:
    files = sorted(str(f) for f in data.glob("*/*.safetensors"))
    subprocess.run(["cat"] + files, stdout=subprocess.DEVNULL, check=True)


def output_tensor(out_dir: Path, name: str) -> torch.Tensor:
    index = out_dir / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(out_dir / file, "pt") as handle:
        return handle.get_tensor(name)


def reference(data: Path, method: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected merged tensor, computed with plain torch in float32, and a mask of the
    entries where an expert's |task vector| equals the TIES trim threshold: there mergelab keeps
    every tied entry and mergekit keeps exactly k (argsort order), so results may differ."""
    experts = torch.stack([output_tensor(data / m, name).float() for m in MODELS])
    if method in ("linear", "floor"):
        return experts.mean(0) if method == "linear" else experts.sum(0), torch.zeros(experts.shape[1:], dtype=bool)
    base = output_tensor(data / "base", name).float()
    deltas, tied = experts - base, torch.zeros(base.shape, dtype=torch.bool)
    k = int(round(DENSITY * base.numel()))
    for delta in deltas:  # TIES trim: keep entries >= the k-th largest |delta|
        threshold = delta.abs().flatten().topk(k).values[-1]
        tied |= delta.abs() == threshold
        delta[delta.abs() < threshold] = 0
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)  # TIES elect
    agree = (torch.sign(deltas) == sign).float()
    return base + (deltas * agree).sum(0) / agree.sum(0).clamp_min(1), tied


def check_output(data: Path, out_dir: Path, case: str, name: str = "model.layers.0.self_attn.k_proj.weight") -> dict:
    """Compare one merged tensor with the plain-torch reference, allowing one bf16 rounding step."""
    method = "floor" if case.startswith("floor") else case.split()[1]
    got = output_tensor(out_dir, name).float()
    expected, tied = reference(data, method, name)
    expected = expected.to(torch.bfloat16).float()
    differ = (got - expected).abs() > expected.abs() * 2**-7 + 1e-8
    return {"tensor": name, "max_abs_diff": float((got - expected).abs().max()),
            "frac_differ": float(differ.float().mean()), "frac_differ_off_ties": float((differ & ~tied).float().mean()),
            "ok": not bool((differ & ~tied).any())}


def run_case(args, case: str, command: list[str], out_dir: Path, env: dict[str, str]) -> dict:
    """Run until --repeats runs were quiet (others used < 10% of the CPUs meanwhile), at most --max-runs."""
    runs, check, digests = [], None, None
    env = {**env, **args.env}
    while sum(r["quiet"] for r in runs) < args.repeats and len(runs) < max(args.repeats, args.max_runs):
        shutil.rmtree(out_dir, ignore_errors=True)
        os.sync()  # no writeback of the previous output during this run
        run = timed(command, args.max_wait, env)
        runs.append(dict(run, quiet=run["others_cpu_s"] <= 0.1 * run["wall_s"] * os.cpu_count()))
        print(f"  {case}: {runs[-1]}", flush=True)
        if check is None:
            check = check_output(args.data, out_dir, case)
            digests = digest(out_dir) if case.startswith("mergelab") else None
            print(f"  check: {check}", flush=True)
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    best = min(runs, key=lambda r: r["wall_s"])
    result = {"command": command, "env": env, "commit": git_head(), "runs": runs, "wall_s": best["wall_s"],
              "cpu_s": min(r["cpu_s"] for r in runs),
              "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "check": check, "digest": digests}
    if case in TARGETS:
        wall, rss = TARGETS[case]
        result.update(target_wall_s=wall, target_rss_gb=rss,
                      met=result["wall_s"] <= wall and result["peak_rss_gb"] <= rss)
    return result


def table(results: dict) -> str:
    lines = ["| case | wall s (min) | peak RSS GB (max) | runs: wall s (others' CPU s) | target | met | output check |",
             "|---|---:|---:|---|---|---|---|"]
    for case, r in results.items():
        target = f"<= {r['target_wall_s']:g} s, <= {r['target_rss_gb']:g} GB" if "met" in r else ""
        met = ("yes" if r["met"] else "**no**") if "met" in r else ""
        met += "" if any(x["quiet"] for x in r["runs"]) else " (no quiet run)"
        walls = ", ".join(f"{x['wall_s']:.1f} ({x['others_cpu_s']:.0f})" for x in r["runs"])
        c = r["check"]
        check = ("ok" if c["ok"] else "**differs**") + (f" ({c['frac_differ']:.2%} differ)" if c["frac_differ"] else "")
        lines.append(f"| {case} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {walls} | {target} | {met} | {check} |")
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    """The issue's targets, each from the measured cases (missing cases: not measured)."""
    def wall(case):
        return results.get(case, {}).get("wall_s")

    def ratio(a, b):
        return wall(a) / wall(b) if wall(a) and wall(b) else None

    def cpu(case):
        return results.get(case, {}).get("cpu_s")

    rows = []
    floor = "floor (read+f32+sum+write) t1"
    if cpu("mergelab ties t1") and cpu(floor):  # steadier than wall time when others share the CPUs
        rows.append(f"| ties t1 / floor t1, own CPU seconds | {cpu('mergelab ties t1') / cpu(floor):.2f} | | |")
    for label, value, limit in [
        ("linear t2 / t1", ratio("mergelab linear t2", "mergelab linear t1"), 0.65),
        ("ties t2 / t1", ratio("mergelab ties t2", "mergelab ties t1"), 0.7),
        ("ties t1 / floor t1", ratio("mergelab ties t1", "floor (read+f32+sum+write) t1"), 2.0),
        ("linear t1 / floor t1", ratio("mergelab linear t1", "floor (read+f32+sum+write) t1"), None),
        ("ties t1 (torch 2 threads) / ties t1", ratio("mergelab ties t1 torch2", "mergelab ties t1"), None),
        ("linear ray / linear t2", ratio("mergelab linear ray", "mergelab linear t2"), None),
        ("ties ray / ties t2", ratio("mergelab ties ray", "mergelab ties t2"), None),
    ]:
        if value is not None:
            met = "" if limit is None else ("yes" if value <= limit else "**no**")
            rows.append(f"| {label} | {value:.2f} | {'' if limit is None else f'<= {limit:g}'} | {met} |")
    for case, r in results.items():
        if case.startswith("mergelab"):
            met = "yes" if r["peak_rss_gb"] <= RSS_TARGET_GB else "**no**"
            rows.append(f"| {case}: peak RSS GB | {r['peak_rss_gb']:.2f} | <= {RSS_TARGET_GB:g} | {met} |")
    for method in ("linear", "ties"):
        ray, local = results.get(f"mergelab {method} ray"), results.get(f"mergelab {method} t2")
        if ray and local and ray.get("digest") and local.get("digest"):
            same = "yes" if ray["digest"] == local["digest"] else "**no**"
            overhead = ray["wall_s"] - local["wall_s"]
            rows.append(f"| {method} ray: byte-identical to local t2 (overhead {overhead:+.1f} s) | | identical | "
                        f"{same} |")
    return "\n".join(["| target | measured | wanted | met |", "|---|---:|---|---|"] + rows)


def output_of(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True).stdout.rstrip()


def git_head() -> str:
    """The commit measured, with '+dirty' when src/ differs from it (others may be editing it)."""
    git = ["git", "-C", str(HERE.parent)]
    dirty = output_of(git + ["status", "--porcelain", "--untracked-files=no", "--", "src"])
    return output_of(git + ["rev-parse", "--short", "HEAD"]) + ("+dirty" if dirty else "")


def run_meta(args) -> dict:
    """Date, commit, machine, versions."""
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_head(),
            "cpus": os.cpu_count(), "machine": platform.platform(), "torch": torch.__version__,
            "device": getattr(args, "device", "cpu"), "repeats": args.repeats, "load1_at_start": os.getloadavg()[0]}
    if args.mergekit_venv:
        meta["mergekit"] = output_of([str(args.mergekit_venv / "bin" / "python"), "-c",
                                "import importlib.metadata as m; print(m.version('mergekit'))"])
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data", help="made by make_llama_748m.py")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="configs and merge outputs")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "merge_748m.json")
    parser.add_argument("--repeats", type=int, default=2, help="quiet runs wanted per case")
    parser.add_argument("--max-runs", type=int, default=5, help="most runs per case while waiting for quiet ones")
    parser.add_argument("--device", default="cpu", help="mergelab merge --device (cuda: the GPU path)")
    parser.add_argument("--no-ray", action="store_true", help="skip the --executor ray cases")
    parser.add_argument("--mergekit-venv", type=Path, help="venv with mergekit installed (mergekit-yaml)")
    parser.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    parser.add_argument("--max-wait", type=float, default=300, help="seconds to wait for an idle machine per run")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in every case's environment, e.g. THP_MEM_ALLOC_ENABLE=1")
    args = parser.parse_args()
    args.env = dict(item.split("=", 1) for item in args.env)
    args.data = args.data.resolve()
    if not (args.data / MODELS[-1] / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_llama_748m.py"), str(args.data)], check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = write_configs(args.data, args.out)
    warm_cache(args.data)
    stored = {"meta": {}, "results": {}}
    if args.only and args.results.is_file():  # a partial run updates the stored results
        stored = json.loads(args.results.read_text())
    results = stored["results"]
    for case, (command, out_dir, env) in cases(args, configs, args.out).items():
        print(f"{case}: {' '.join(command)}", flush=True)
        results[case] = run_case(args, case, command, out_dir, env)
    print(table(results))
    print()
    print(targets_table(results))
    meta = {**stored["meta"], **run_meta(args)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
