"""LM-Cocktail Eq. 2: merge weights w_i = softmax(−L(M_i, E_t) / τ) from few-shot losses."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from mergelab.cocktail.loss import Loaded, LossOptions, candidate_loss, check_examples
from mergelab.config import read_records
from mergelab.errors import MergelabError
from mergelab.adapters.loading import check_model_dir  # mergelab.loading's, plus adapter candidates
from mergelab.threads import Threads, check_threads


def softmax_weights(losses: Sequence[float], temperature: float = 5.0) -> list[float]:
    """softmax(−loss / τ), computed stably."""
    if temperature <= 0:
        raise MergelabError(f"temperature must be > 0, got {temperature}")
    logits = [-loss / temperature for loss in losses]
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    return [e / sum(exps) for e in exps]


def fewshot_losses(models: Sequence[str | Path], examples: Sequence[dict], model_type: str = "decoder", *,
                   options: LossOptions = LossOptions(), batch_size: int = 8, device: str = "cpu",
                   tokenizer: str | Path | None = None, threads: Threads = "auto") -> list[float]:
    """L(M_i, E_t) for each candidate, loading one candidate at a time (all are checked first)."""
    check_examples(examples, model_type, options.neg_number)
    check_threads(threads)
    if not models:
        raise MergelabError("no candidate models given")
    for path in models:
        check_model_dir(path, tokenizer, what="candidate")
    previous = Loaded.take()  # candidates of one architecture share one model, refilled in place
    losses = [candidate_loss(path, examples, model_type, options=options, batch_size=batch_size, device=device,
                             tokenizer=tokenizer, threads=threads, previous=previous)
              for path in models]
    previous.put_back()  # a small model is kept for the next call
    return losses


def fewshot_weights(models: Sequence[str | Path], examples: Sequence[dict], model_type: str = "decoder",
                    temperature: float = 5.0, batch_size: int = 8, *, options: LossOptions = LossOptions(),
                    device: str = "cpu", tokenizer: str | Path | None = None,
                    threads: Threads = "auto") -> list[float]:
    """LM-Cocktail merge weights for ``models`` from a few examples of the target task.

    Args:
        models: candidate model directories (base and peers; the fine-tuned model too if it
            should compete).
        examples: decoder ``{"input", "output"}`` or encoder ``{"query", "pos", "neg"}`` dicts.
        model_type: "decoder" (causal LM) or "encoder" (embedding model).
        temperature: τ of Eq. 2; larger spreads the weights more evenly.
        batch_size: examples per forward pass.
        options: how the loss is computed (``LossOptions``: max_length; encoders: pooling,
            neg_number, query_instruction, contrastive_temperature).
        device: where the candidates run.
        tokenizer: a directory whose tokenizer every candidate uses instead of its own.
        threads: torch CPU threads, a number or "auto" (the default: one thread for models under
            ``mergelab.threads.SMALL_MODEL_PARAMS`` or on a busy machine, else the idle cores).

    Returns:
        One weight per model, summing to 1.

    Example:
        >>> fewshot_weights(["base", "peer"], [{"input": "2+2=", "output": "4"}])  # doctest: +SKIP
        [0.31, 0.69]
    """
    if temperature <= 0:
        raise MergelabError(f"temperature must be > 0, got {temperature}")
    losses = fewshot_losses(models, examples, model_type, options=options, batch_size=batch_size, device=device,
                            tokenizer=tokenizer, threads=threads)
    return softmax_weights(losses, temperature)


def load_examples(source: str | Path | Sequence[dict] | Mapping[str, Sequence[dict]], model_type: str | None = None,
                  neg_number: int = 7) -> list[dict] | dict:
    """Examples from a JSON list / JSONL file, a list of dicts, or a dict of task -> examples.

    With ``model_type``, a file's examples are also checked (keys, negatives), and errors name the file.
    """
    if isinstance(source, (str, Path)):
        examples = read_records(source, "examples file")
        if model_type is not None:
            if not isinstance(examples, list):
                raise MergelabError(f"examples file {source} must hold a list of examples (JSON list or JSONL)")
            check_examples(examples, model_type, neg_number, where=f"examples file {source}")
        return examples
    return source


def pooled(examples: list[dict] | Mapping[str, Sequence[dict]]) -> list[dict]:
    """The examples of several tasks pooled into one list (LM-Cocktail^u); a list passes through."""
    if isinstance(examples, Mapping):
        return [example for task_examples in examples.values() for example in task_examples]
    return list(examples)
