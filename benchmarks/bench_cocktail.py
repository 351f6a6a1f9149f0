"""LM-Cocktail weights: 4 decoder candidates of ~27M parameters, 5 examples, CPU, the API's defaults.

    python benchmarks/bench_cocktail.py [--repeats 3] [--threads auto] [--neighbour both] [--json out.json]

Every measurement runs in a fresh process, as a user's first call would: ``fewshot_weights``
with default settings (``threads="auto"``), loading the models from disk included.

* *first call*: the first ``fewshot_weights`` in a new process, importing transformers' model
  classes included;
* *import*: ``import transformers`` + the Llama model and tokenizer classes, alone (another
  fresh process, before its first call), and *setup*: the checkpoint-renaming table that
  transformers 5 builds on a process's first ``from_pretrained`` (a few hundred regexes);
* *first after import*: that process's first call, once the import is paid;
* *warm*: the best of ``--repeats`` further calls.

The first call should cost no more than warm + import + setup (issue 17); *first after import −
warm* is whatever else a first call pays. ``--neighbour busy`` runs a CPU-bound process beside it
(a pure-Python busy loop holding one core). Issue-17 target: warm <= 1.0 s on a 2-core
machine, with and without the neighbour.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = [{"input": " ".join(f"w{i + j}" for j in range(30)), "output": " ".join(f"w{i * 7 + j}" for j in range(10))}
            for i in range(5)]


def build_candidates(root: Path, count: int = 4) -> list[Path]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_eval import tokenizer_with
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergelab.loading import quiet_transformers

    config = LlamaConfig(vocab_size=8000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1376, tie_word_embeddings=False,
                         max_position_embeddings=512)
    tokenizer = tokenizer_with(8000)
    paths = []
    for index in range(count):
        torch.manual_seed(index)
        model = LlamaForCausalLM(config)
        path = root / f"candidate-{index}"
        with quiet_transformers():
            model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"{count} candidates of {params / 1e6:.1f}M parameters each")
    return paths


def measure(paths: list[str], threads: str, repeats: int, preimport: bool) -> dict:
    """In this (fresh) process: optionally the transformers import alone, the first call, warm calls."""
    started = time.perf_counter()
    from mergelab.cocktail import fewshot_weights  # mergelab's modules and torch; transformers loads on first use

    result = {"import_mergelab_s": time.perf_counter() - started}
    if preimport:
        started = time.perf_counter()
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401
        from transformers import PreTrainedTokenizerFast  # noqa: F401

        result["import_transformers_s"] = time.perf_counter() - started
        # transformers 5 builds (and caches) its checkpoint-renaming table, compiling a few
        # hundred regexes, on the first from_pretrained of a process: its one-time cost too.
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        started = time.perf_counter()
        get_checkpoint_conversion_mapping("llama")
        result["transformers_first_load_setup_s"] = time.perf_counter() - started
    threads_value = int(threads) if threads.isdigit() else threads
    started = time.perf_counter()
    weights = fewshot_weights(paths, EXAMPLES, temperature=5.0, threads=threads_value)
    result["first_s"] = time.perf_counter() - started
    warm, warm_cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        fewshot_weights(paths, EXAMPLES, temperature=5.0, threads=threads_value)
        warm.append(time.perf_counter() - started)
        warm_cpu.append(time.process_time() - started_cpu)  # steadier than wall time on a shared machine
    import resource

    from mergelab.loading import model_params
    from mergelab.threads import resolve_threads

    result.update(warm_s=min(warm), warm_runs=warm, warm_cpu_s=min(warm_cpu), weights=weights,
                  auto_threads=resolve_threads(threads_value, model_params(paths[0])),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def run(paths: list[Path], threads: str, repeats: int, preimport: bool, neighbour: bool) -> dict:
    neighbour_process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
    try:
        done = subprocess.run([sys.executable, __file__, "--measure", threads, str(repeats), str(int(preimport)),
                               *map(str, paths)], capture_output=True, text=True, check=True)
    finally:
        if neighbour_process is not None:
            neighbour_process.kill()
            neighbour_process.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="auto", help="threads= of fewshot_weights: auto (default) or a number")
    parser.add_argument("--neighbour", default="both", choices=["none", "busy", "both"])
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--measure", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        threads, repeats, preimport, *paths = args.measure
        print(json.dumps(measure(paths, threads, int(repeats), preimport == "1")))
        return
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        paths = build_candidates(Path(root))
        for neighbour in {"none": [False], "busy": [True], "both": [False, True]}[args.neighbour]:
            load = os.getloadavg()[0]
            cold = run(paths, args.threads, args.repeats, False, neighbour)
            split = run(paths, args.threads, args.repeats, True, neighbour)
            row = {"neighbour": "busy" if neighbour else "none", "threads": args.threads, "load1_before": load,
                   "cold": cold, "preimported": split}
            rows.append(row)
            print(f"neighbour {row['neighbour']:4}  threads={args.threads} (-> {cold['auto_threads']}):  "
                  f"first call {cold['first_s']:.2f} s, warm {cold['warm_s']:.2f} s "
                  f"(runs {[round(t, 2) for t in cold['warm_runs']]}, {cold['warm_cpu_s']:.2f} CPU s);  import transformers "
                  f"{split['import_transformers_s']:.2f} s + setup {split['transformers_first_load_setup_s']:.2f} s, "
                  f"first after them {split['first_s']:.2f} s, warm {split['warm_s']:.2f} s;  "
                  f"from mergelab.cocktail import fewshot_weights {cold['import_mergelab_s']:.2f} s, "
                  f"peak RSS {cold['peak_rss_mb']:.0f} MB", flush=True)
    print(f"weights {[round(w, 4) for w in cold['weights']]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
