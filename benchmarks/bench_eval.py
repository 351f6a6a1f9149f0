"""Rank classification throughput: 500 four-option items on a ~5M-parameter Llama, CPU.

    python benchmarks/bench_eval.py [--items 500] [--batch-size 32] [--repeats 3] [--threads 1]

Issue #5 target: <= 10 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def tokenizer_with(words: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(words - 4)])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    core.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from mergelab.evaluate import evaluate_task, make_task

    vocab = 8000
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=688, tie_word_embeddings=True,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    tokenizer = tokenizer_with(vocab)
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))

    items = [{"input": words(rng.randint(20, 40)), "options": [words(rng.randint(1, 5)) for _ in range(4)],
              "answer": rng.randrange(4)} for _ in range(args.items)]
    task = make_task({"name": "bench", "kind": "rank_classification", "examples": items})
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        accuracy = evaluate_task(model, tokenizer, task, batch_size=args.batch_size)
        times.append(time.perf_counter() - start)
    print(f"model: {params / 1e6:.1f}M parameters, {args.items} items x 4 options, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"rank classification: best {min(times):.2f} s, runs {[round(t, 2) for t in times]} "
          f"(accuracy {accuracy:.3f}, chance 0.25)")


if __name__ == "__main__":
    main()
