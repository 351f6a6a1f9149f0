"""LM-Cocktail weights: 4 decoder candidates of ~25M parameters, 5 examples, CPU.

    python benchmarks/bench_cocktail.py [--repeats 3] [--threads 1]

Issue #3 target: <= 1.5 s after imports, loading the models from disk included.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch


def build_candidates(root: Path, count: int = 4) -> list[Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_eval import tokenizer_with
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1376, tie_word_embeddings=False,
                         max_position_embeddings=512)
    tokenizer = tokenizer_with(8000)
    paths = []
    for index in range(count):
        torch.manual_seed(index)
        model = LlamaForCausalLM(config)
        path = root / f"candidate-{index}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"{count} candidates of {params / 1e6:.1f}M parameters each")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from mergelab.cocktail import fewshot_weights

    hf_logging.disable_progress_bar()
    examples = [{"input": " ".join(f"w{i + j}" for j in range(30)), "output": " ".join(f"w{i * 7 + j}" for j in range(10))}
                for i in range(5)]
    with tempfile.TemporaryDirectory() as root:
        paths = build_candidates(Path(root))
        fewshot_weights(paths[:1], examples)  # warm the import of model classes, not the models
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            weights = fewshot_weights(paths, examples, temperature=5.0)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"weights {[round(w, 4) for w in weights]}")
    print(f"fewshot_weights: best {min(times):.2f} s, runs {[round(t, 2) for t in times]}, "
          f"peak RSS {peak:.0f} MB (one candidate ~{27e6 * 4 / 2**20:.0f} MB in float32)")


if __name__ == "__main__":
    main()
