"""Merge tiny Llama checkpoints with mergekit and with mergelab from the same YAML; compare the tensors.

One config per mergekit method (plus variants: base_model, row-wise, gradients, mergekit's own
examples with our models), each run by `mergekit-yaml` from its own venv and by `mergelab.merge`
here. For each config it records whether each tool accepted it, mergelab's plan-time notes
(where it deliberately differs), and the difference of the outputs: the largest absolute
difference, and the relative difference ‖mergelab − mergekit‖ / ‖mergekit‖ over all tensors.
Where mergelab has a key that selects mergekit's behaviour (keep_ties, rescale_l1), the config
is also run with it ("parity" columns). Not part of CI: mergekit pins its own dependencies.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 \\
        && /tmp/mkvenv/bin/pip install mergekit==0.1.5
    python benchmarks/compare_mergekit.py --mergekit-venv /tmp/mkvenv [--only nuslerp]

Writes benchmarks/results/compare_mergekit.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

import mergelab
from mergelab.devices import torch_threads
from mergelab.io import CheckpointReader
from mergelab.lm import build_tokenizer, tiny_llama

HERE = Path(__file__).resolve().parent
NOISE = 0.01  # experts are the base plus N(0, NOISE) per entry
SAME = 1e-5  # a relative difference below this is float32 rounding


def build_models(root: Path) -> dict[str, Path]:
    """A float32 tiny Llama base (untied lm_head) and three experts: base + seeded noise."""
    base = tiny_llama(seed=0, tie=False, hidden=64, layers=4, intermediate=128)
    paths = {}
    tokenizer = build_tokenizer()
    for index, name in enumerate(["base", "a", "b", "c"]):
        model = tiny_llama(seed=0, tie=False, hidden=64, layers=4, intermediate=128)
        model.load_state_dict(base.state_dict())
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * NOISE)
        for suffix, dtype in (("", torch.float32), ("16", torch.bfloat16)):  # bf16 values tie often
            paths[name + suffix] = root / (name + suffix)
            model.to(dtype).save_pretrained(paths[name + suffix])  # .to converts in place: float32 first
            tokenizer.save_pretrained(paths[name + suffix])
    return paths


def _models(*entries) -> list[dict]:
    """("a", {"weight": 1}) or "a" -> a models[] entry (names replaced by paths later)."""
    return [{"model": e} if isinstance(e, str) else {"model": e[0], "parameters": e[1]} for e in entries]


W = {"weight": 1.0}
# name: (config, the mergelab-only parameters that select mergekit's behaviour, or None)
CASES: dict[str, tuple[dict, dict | None]] = {
    "linear": ({"merge_method": "linear", "models": _models(("a", W), ("b", {"weight": 0.5}), ("c", {"weight": 0.25}))},
               None),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": "base",
                         "models": _models(("a", W), ("b", {"weight": 0.5})), "parameters": {"lambda": 0.8}}, None),
    "ties": ({"merge_method": "ties", "base_model": "base", "models": _models(("a", W), ("b", W), ("c", W)),
              "parameters": {"density": 0.5}}, {"keep_ties": False}),
    "ties (bfloat16 checkpoints)": ({"merge_method": "ties", "base_model": "base16",
                                     "models": _models(("a16", W), ("b16", W), ("c16", W)),
                                     "parameters": {"density": 0.3}}, {"keep_ties": False}),
    "ties (no density)": ({"merge_method": "ties", "base_model": "base", "models": _models(("a", W), ("b", W))},
                          None),
    "dare_linear": ({"merge_method": "dare_linear", "base_model": "base", "models": _models(("a", W), ("b", W)),
                     "parameters": {"density": 0.5}}, {"rescale_l1": True}),
    "dare_ties": ({"merge_method": "dare_ties", "base_model": "base", "models": _models(("a", W), ("b", W), ("c", W)),
                   "parameters": {"density": 0.5}}, {"rescale_l1": True}),
    "dare_ties (density 1)": ({"merge_method": "dare_ties", "base_model": "base",
                               "models": _models(("a", W), ("b", W), ("c", W))}, None),
    "breadcrumbs": ({"merge_method": "breadcrumbs", "base_model": "base", "models": _models(("a", W), ("b", W)),
                     "parameters": {"density": 0.8, "gamma": 0.05}}, {"keep_ties": False}),
    "breadcrumbs_ties": ({"merge_method": "breadcrumbs_ties", "base_model": "base",
                          "models": _models(("a", W), ("b", W), ("c", W)),
                          "parameters": {"density": 0.8, "gamma": 0.05}}, {"keep_ties": False}),
    "della": ({"merge_method": "della", "base_model": "base", "models": _models(("a", W), ("b", W), ("c", W)),
               "parameters": {"density": 0.5, "epsilon": 0.1}}, {"rescale_l1": True}),
    "della_linear": ({"merge_method": "della_linear", "base_model": "base", "models": _models(("a", W), ("b", W)),
                      "parameters": {"density": 0.5, "epsilon": 0.1}}, {"rescale_l1": True}),
    "sce": ({"merge_method": "sce", "base_model": "base", "models": _models("a", "b", "c"),
             "parameters": {"select_topk": 0.5}}, {"keep_ties": False}),
    "ram": ({"merge_method": "ram", "base_model": "base", "models": _models("a", "b"),
             "parameters": {"epsilon": 0.005}}, None),
    "ramplus_tl": ({"merge_method": "ramplus_tl", "base_model": "base", "models": _models("a", "b", "c"),
                    "parameters": {"epsilon": 0.005}}, None),
    "passthrough": ({"merge_method": "passthrough", "models": _models(("a", {"scale": 0.5}))}, None),
    "slerp": ({"merge_method": "slerp", "base_model": "a", "models": _models("a", "b"), "parameters": {"t": 0.3}},
              None),
    "nuslerp": ({"merge_method": "nuslerp", "models": _models(("a", {"weight": 0.3}), ("b", {"weight": 0.7}))}, None),
    "nuslerp (base_model)": ({"merge_method": "nuslerp", "base_model": "base",
                              "models": _models(("a", W), ("b", {"weight": 2.0}))}, None),
    "nuslerp (rows)": ({"merge_method": "nuslerp", "models": _models(("a", W), ("b", {"weight": 3.0})),
                        "parameters": {"nuslerp_flatten": False}}, None),
    "nuslerp (columns)": ({"merge_method": "nuslerp", "models": _models(("a", W), ("b", {"weight": 3.0})),
                           "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}, None),
    "multislerp": ({"merge_method": "multislerp",
                    "models": _models(("a", W), ("b", {"weight": 0.5}), ("c", {"weight": 0.5}))}, None),
    "multislerp (base_model)": ({"merge_method": "multislerp", "base_model": "base",
                                 "models": _models(("a", W), ("b", W), ("c", {"weight": 2.0}))}, None),
    "karcher": ({"merge_method": "karcher", "models": _models("a", "b", "c")}, None),
    "karcher (max_iter 3)": ({"merge_method": "karcher", "models": _models("a", "b", "c"),
                              "parameters": {"max_iter": 3, "tol": 1e-7}}, None),
    "nearswap": ({"merge_method": "nearswap", "base_model": "base", "models": _models("a"),
                  "parameters": {"t": 0.005}}, None),
    "arcee_fusion": ({"merge_method": "arcee_fusion", "base_model": "base", "models": _models("a")}, None),
    "model_stock": ({"merge_method": "model_stock", "base_model": "base", "models": _models("a", "b", "c")}, None),
    # mergekit's examples/ties.yml with our models (dtype float32): gradients and a filtered weight
    "examples/ties.yml": ({"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
        {"model": "b", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
        {"model": "c", "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}],
        "parameters": {"normalize": True, "int8_mask": True}}, {"keep_ties": False}),
    # mergekit's examples/gradient-slerp.yml in its models: form
    "examples/gradient-slerp.yml": ({"merge_method": "slerp", "base_model": "a", "models": _models("a", "b"),
                                     "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                          {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                          {"value": 0.5}]}}, None),
    "linear, dtype bfloat16": ({"merge_method": "linear", "models": _models(("a", W), ("b", W)),
                                "dtype": "bfloat16"}, None),
    "linear, tokenizer_source a model": ({"merge_method": "linear", "models": _models(("a", W), ("b", W)),
                                       "tokenizer_source": "a"}, None),
    "linear, base_model not listed": ({"merge_method": "linear", "base_model": "base",
                                       "models": _models(("a", W), ("b", W))}, None),
}


def materialize(config: dict, paths: dict[str, Path], extra: dict | None = None) -> dict:
    config = json.loads(json.dumps(config))  # a deep copy
    for entry in config["models"]:
        entry["model"] = str(paths[entry["model"]])
    for key in ("base_model", "tokenizer_source"):
        if config.get(key) in paths:
            config[key] = str(paths[config[key]])
    config.setdefault("dtype", "float32")
    if extra:
        config["parameters"] = {**config.get("parameters", {}), **extra}
    return config


def run_mergekit(venv: Path, config_path: Path, out: Path) -> tuple[str | None, float]:
    command = [str(venv / "bin" / "mergekit-yaml"), str(config_path), str(out), "--no-copy-tokenizer",
               "--no-write-model-card", "--quiet", "--random-seed", "0", "--num-threads", "1"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        return (lines[-1] if lines else f"exit {done.returncode}")[:300], seconds
    return None, seconds


class Notes(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def run_mergelab(config: dict, out: Path) -> tuple[str | None, list[str], float]:
    notes = Notes()
    logger = logging.getLogger("mergelab")
    logger.addHandler(notes)
    start = time.perf_counter()
    try:
        with torch_threads(1):
            mergelab.merge(config, out, quiet=True, force=True, no_model_card=True)
        return None, notes.records, time.perf_counter() - start
    except mergelab.MergelabError as exc:
        return str(exc).splitlines()[0][:300], notes.records, time.perf_counter() - start
    finally:
        logger.removeHandler(notes)


def compare(ours: Path, theirs: Path) -> dict:
    """Largest absolute and relative (‖a − b‖/‖b‖ over all tensors) differences, and the worst tensor."""
    mine, reference = CheckpointReader(ours), CheckpointReader(theirs)
    names = sorted(set(mine.tensors) & set(reference.tensors))
    squared_difference = squared_reference = 0.0
    max_abs, worst, worst_relative = 0.0, None, -1.0
    for name in names:
        a, b = mine.get(name).double(), reference.get(name).double()
        difference = float((a - b).norm()) ** 2
        squared_difference += difference
        squared_reference += float(b.norm()) ** 2
        max_abs = max(max_abs, float((a - b).abs().max()))
        relative = math.sqrt(difference) / max(float(b.norm()), 1e-30)
        if relative > worst_relative:
            worst, worst_relative = name, relative
    result = {
        "tensors": len(names), "max_abs": max_abs,
        "relative": math.sqrt(squared_difference / max(squared_reference, 1e-30)),
        "worst_tensor": worst, "worst_relative": worst_relative,
        "only_mergelab": sorted(set(mine.tensors) - set(reference.tensors)),
        "only_mergekit": sorted(set(reference.tensors) - set(mine.tensors)),
    }
    mine.close()
    reference.close()
    return result


def verdict(row: dict) -> str:
    if row["mergekit_error"] and row["mergelab_error"]:
        return "both refuse"
    if row["mergekit_error"]:
        return "mergekit refuses"
    if row["mergelab_error"]:
        return "mergelab refuses"
    best = min(x["relative"] for x in (row["diff"], row.get("parity_diff")) if x)
    if row["diff"]["relative"] < SAME:
        return "same"
    return "same with parity keys" if best < SAME else "differs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/mkvenv"))
    parser.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "compare_mergekit.json")
    args = parser.parse_args()
    version = subprocess.run([str(args.mergekit_venv / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_models(root / "models")
        for name, (config, parity) in CASES.items():
            if args.only and not any(o in name for o in args.only):
                continue
            slug = "".join(c if c.isalnum() else "_" for c in name)
            config_path = root / f"{slug}.yml"
            config_path.write_text(yaml.safe_dump(materialize(config, paths)))
            mk_error, mk_seconds = run_mergekit(args.mergekit_venv, config_path, root / f"mk-{slug}")
            ml_error, notes, ml_seconds = run_mergelab(materialize(config, paths), root / f"ml-{slug}")
            row = {"case": name, "config": config, "mergekit_error": mk_error, "mergelab_error": ml_error,
                   "mergelab_notes": notes, "seconds": {"mergekit": round(mk_seconds, 2),
                                                        "mergelab": round(ml_seconds, 2)},
                   "diff": None, "parity": parity, "parity_diff": None}
            if not mk_error and not ml_error:
                row["diff"] = compare(root / f"ml-{slug}", root / f"mk-{slug}")
                if parity:
                    error, _, _ = run_mergelab(materialize(config, paths, parity), root / f"mlp-{slug}")
                    row["parity_diff"] = {"error": error} if error else compare(root / f"mlp-{slug}",
                                                                                root / f"mk-{slug}")
            row["verdict"] = verdict(row) if not (row["parity_diff"] or {}).get("error") else "parity run failed"
            rows.append(row)
            print(f"{name}: {row['verdict']}", flush=True)
            for directory in root.glob(f"*-{slug}"):
                shutil.rmtree(directory)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mergekit": version,
              "torch": torch.__version__, "platform": platform.platform(), "noise": NOISE, "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.results.exists():  # keep the other cases of an earlier full run
        earlier = {row["case"]: row for row in json.loads(args.results.read_text())["rows"]}
        earlier.update({row["case"]: row for row in rows})
        report["rows"] = [earlier[name] for name in CASES if name in earlier]
    args.results.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report["rows"]))


def _number(diff: dict | None, key: str) -> str:
    return "" if not diff or "error" in diff else f"{diff[key]:.2g}"


def markdown(rows: list[dict]) -> str:
    lines = ["| case | verdict | relative diff | max abs diff | with parity keys: relative | notes / refusal |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        reason = row["mergekit_error"] and f"mergekit: {row['mergekit_error']}"
        reason = reason or (row["mergelab_error"] and f"mergelab: {row['mergelab_error']}")
        parity = row["parity_diff"]
        keys = ", ".join(f"{k}: {str(v).lower()}" for k, v in (row["parity"] or {}).items())
        lines.append(f"| {row['case']} | {row['verdict']} | {_number(row['diff'], 'relative')} | "
                     f"{_number(row['diff'], 'max_abs')} | {_number(parity, 'relative')}"
                     f"{f' ({keys})' if parity and 'error' not in parity else ''} | "
                     f"{(reason or '; '.join(row['mergelab_notes'])).replace('|', '/')[:200]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
