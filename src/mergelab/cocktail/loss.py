"""LM-Cocktail's few-shot loss L(M_i, E_t) for one candidate, decoder or encoder.

Decoder (causal LM): each example ``{"input", "output"}`` is scored as ``input + " " + output``
followed by EOS, counting only the output tokens and EOS; a candidate's loss is the mean over
examples of each example's mean token cross-entropy.

Encoder (embedding model): each example ``{"query", "pos": [...], "neg": [...]}`` contributes
its query, its first positive and its first ``neg_number`` negatives; within a batch every
query is scored against every passage of the batch (in-batch negatives) with cosine / 0.05,
and the loss is the cross-entropy of picking its own positive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mergelab.errors import MergelabError
from mergelab.evaluate.decoder import example_losses
from mergelab.evaluate.encoder import embed
from mergelab.evaluate.runner import check_tokenizer, pooling_of

MODEL_TYPES = ("decoder", "encoder")


def check_examples(examples: Sequence[dict], model_type: str, neg_number: int = 7, where: str = "examples") -> None:
    """Refuse empty lists, missing keys and too few negatives before any model is loaded."""
    if model_type not in MODEL_TYPES:
        raise MergelabError(f"model_type '{model_type}' is not known; use 'decoder' or 'encoder'")
    if not examples:
        raise MergelabError(f"{where}: the example list is empty; give at least one few-shot example (5 is the default)")
    for number, example in enumerate(examples):
        if not isinstance(example, dict):
            raise MergelabError(f"{where}, example {number}: must be a mapping")
        if model_type == "decoder":
            missing = [k for k in ("input", "output") if k not in example]
        else:
            missing = [k for k in ("query", "pos", "neg") if k not in example]
        if missing:
            raise MergelabError(f"{where}, example {number} is missing {', '.join(map(repr, missing))} "
                             f"({model_type} examples need "
                             f"{'input and output' if model_type == 'decoder' else 'query, pos and neg'})")
        if model_type == "encoder":
            if not example["pos"]:
                raise MergelabError(f"{where}, example {number} has no positive passage")
            if len(example["neg"]) < neg_number:
                raise MergelabError(f"{where}, example {number} has {len(example['neg'])} negatives but neg_number is "
                                 f"{neg_number}; add negatives or lower neg_number")


def load_candidate(path: str | Path, model_type: str, device: str = "cpu"):
    """(model, tokenizer) of one candidate, in float32, in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise MergelabError(f"candidate model {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        loader = AutoModelForCausalLM if model_type == "decoder" else AutoModel
        model = loader.from_pretrained(path, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as exc:
        raise MergelabError(f"cannot load candidate {path} as a {model_type}: {exc}") from None
    check_tokenizer(model, tokenizer, str(path))
    return model, tokenizer


def decoder_loss(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 8, max_length: int = 2048,
                 device=None) -> float:
    losses = example_losses(model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device)
    return sum(loss for loss, _ in losses) / len(losses)


@torch.no_grad()
def encoder_loss(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 8, neg_number: int = 7,
                 temperature: float = 0.05, pooling: str = "cls", max_length: int = 512,
                 query_instruction: str = "", device=None) -> float:
    total, count = 0.0, 0
    group = 1 + neg_number
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        queries = [query_instruction + e["query"] for e in batch]
        passages = [p for e in batch for p in [e["pos"][0], *e["neg"][:neg_number]]]
        options = dict(pooling=pooling, batch_size=64, max_length=max_length, device=device)
        q = embed(model, tokenizer, queries, **options)  # (B, H), normalized
        p = embed(model, tokenizer, passages, **options)  # (B·group, H)
        scores = q @ p.T / temperature  # (B, B·group)
        targets = torch.arange(len(batch), device=scores.device) * group
        total += float(torch.nn.functional.cross_entropy(scores, targets, reduction="sum"))
        count += len(batch)
    return total / count


def candidate_loss(path: str | Path, examples: Sequence[dict], model_type: str = "decoder", *,
                   batch_size: int = 8, device: str = "cpu", **opts) -> float:
    """Load one candidate, compute its few-shot loss, free it."""
    model, tokenizer = load_candidate(path, model_type, device)
    try:
        if model_type == "decoder":
            return decoder_loss(model, tokenizer, examples, batch_size=batch_size, device=device,
                                max_length=opts.get("max_length", 2048))
        pooling = opts.get("pooling") or pooling_of(path)
        return encoder_loss(model, tokenizer, examples, batch_size=batch_size, device=device, pooling=pooling,
                            neg_number=opts.get("neg_number", 7), temperature=opts.get("contrastive_temperature", 0.05),
                            max_length=opts.get("max_length", 512),
                            query_instruction=opts.get("query_instruction", ""))
    finally:
        del model
