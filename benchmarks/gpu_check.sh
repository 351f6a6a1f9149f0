#!/usr/bin/env bash
# The GPU path in one short run: linear, TIES and DARE-TIES merges with --device cuda on the
# 748M benchmark models, each checked tensor by tensor against the same merge on the CPU
# (DARE's masks are drawn on the CPU, so they must agree too), then the CUDA timings of
# bench_merge.py; before them, every registered method on the demo world's tiny models
# (benchmarks/gpu_methods_check.py). Writes benchmarks/results/gpu_methods.json,
# benchmarks/results/gpu_check.json and benchmarks/results/merge_748m_cuda.json.
#
#   bash benchmarks/gpu_check.sh              # needs torch with CUDA and a visible GPU
#
# About 5-8 minutes on one GPU with 16 CPU cores: building the models (~1-2 min, skipped when
# benchmarks/data has them), three CPU and three CUDA merges, and the timed CUDA cases.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi

"$PYTHON" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device: install a CUDA build of torch, check nvidia-smi"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
EOF

# every registered method on tiny models first (seconds): CPU against CUDA, tensor by tensor;
# WORLD=DIR names a built demo world (else the demo world is built or reused, a few minutes)
"$PYTHON" benchmarks/gpu_methods_check.py --device cuda ${WORLD:+--world "$WORLD"} \
    --json benchmarks/results/gpu_methods.json

[ -f benchmarks/data/expert4/model.safetensors.index.json ] || "$PYTHON" benchmarks/make_llama_748m.py

"$PYTHON" - <<'EOF'
"""CPU vs CUDA: every output tensor of linear, ties and dare_ties, bit for bit."""
import json, os, shutil, time
from pathlib import Path

import torch
from safetensors import safe_open

import mergelab

data = Path("benchmarks/data").resolve()
out = Path("benchmarks/out/gpu_check")
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
experts = [str(data / f"expert{i}") for i in range(1, 5)]
common = {"dtype": "float32", "out_dtype": "bfloat16"}
configs = {
    "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts]},
    "ties": {"merge_method": "ties", "base_model": str(data / "base"),
             "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}} for m in experts]},
    "dare_ties": {"merge_method": "dare_ties", "base_model": str(data / "base"),
                  "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}} for m in experts]},
}


def tensors(directory: Path):
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "methods": {}}
for method, config in configs.items():
    config = {**config, **common}
    seconds = {}
    for device in ("cpu", "cuda"):
        start = time.perf_counter()
        mergelab.merge(config, out / f"{method}-{device}", device=device, quiet=True, seed=0, no_model_card=True)
        seconds[device] = round(time.perf_counter() - start, 2)
    cuda = dict(tensors(out / f"{method}-cuda"))
    differing, entries, worst = [], 0, 0.0
    for name, cpu in tensors(out / f"{method}-cpu"):
        other = cuda[name]
        if not torch.equal(cpu, other):
            bad = (cpu.float() != other.float())
            differing.append(name)
            entries += int(bad.sum())
            worst = max(worst, float((cpu.float() - other.float()).abs().max()))
    report["methods"][method] = {"seconds": seconds, "tensors": len(cuda), "differing_tensors": len(differing),
                                 "differing_entries": entries, "max_abs_diff": worst, "first": differing[:3]}
    print(method, report["methods"][method], flush=True)
    for device in ("cpu", "cuda"):
        shutil.rmtree(out / f"{method}-{device}")
report["equal"] = all(r["differing_tensors"] == 0 for r in report["methods"].values())
Path("benchmarks/results").mkdir(exist_ok=True)
Path("benchmarks/results/gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print("CUDA output equals the CPU's:", report["equal"])
EOF

"$PYTHON" benchmarks/bench_merge.py --device cuda --no-ray --repeats 1 --max-runs 1 --max-wait 5 \
    --only "floor" "linear t1" "ties t1" --results benchmarks/results/merge_748m_cuda.json
