"""Diagonal (empirical) Fisher information of a transformers causal LM, saved as safetensors
with the checkpoint's tensor names, for ``merge_method: fisher``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from mergelab.config import read_records
from mergelab.errors import MergelabError


def read_texts(path: str | Path) -> list[str]:
    """Texts from a JSON list or a JSONL file: strings, ``{"text": ...}`` or
    ``{"input": ..., "output": ...}`` (joined by a space)."""
    path = Path(path)
    items = read_records(path)
    if not isinstance(items, list):
        raise MergelabError(f"{path} must hold a list of examples (JSON list or JSONL)")
    texts = []
    for number, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and "text" in item:
            texts.append(str(item["text"]))
        elif isinstance(item, dict) and "input" in item and "output" in item:
            texts.append(f"{item['input']} {item['output']}")
        else:
            raise MergelabError(f"{path}: item {number} must be a string or have 'text' or 'input'/'output'")
    if not texts:
        raise MergelabError(f"{path} holds no examples")
    return texts


def fisher_diagonal(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each example's log-likelihood.

    Each batch is one example (``input_ids``, optional ``attention_mask`` and ``labels``);
    squaring per example is what makes this the empirical Fisher rather than the squared
    mean gradient. Returns float32 tensors keyed by ``model.state_dict()`` names (tied
    parameters appear under every name; non-trainable float buffers get zeros).
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        labels = batch.get("labels", batch["input_ids"])
        model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels).loss.backward()
        for name, param in params.items():
            if param.grad is not None:
                sums[name].add_(param.grad.detach().float().square())
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise MergelabError("no examples to estimate the Fisher from")
    by_storage = {param.data_ptr(): sums[name].div_(count) for name, param in params.items()}
    fisher = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.dtype.is_floating_point:
            continue
        found = by_storage.get(tensor.data_ptr())
        fisher[name] = found.clone() if found is not None else torch.zeros(tensor.shape, dtype=torch.float32)
    return fisher


def estimate_fisher(model_dir: str | Path, texts: list[str], out_path: str | Path, *, max_samples: int | None = None,
                    max_length: int = 512, device: str = "cpu", force: bool = False) -> Path:
    """Estimate the diagonal Fisher of a causal LM on ``texts`` and save it.

    Example:
        >>> estimate_fisher("experts/math", ["2 + 2 = 4", "3 + 5 = 8"], "math.fisher.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise MergelabError(f"{out_path} already exists; remove it or pass --force")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MergelabError(f"model directory {model_dir} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    texts = texts[:max_samples] if max_samples else texts

    def batches():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            if tokenizer.eos_token_id is not None:
                eos = torch.tensor([[tokenizer.eos_token_id]])
                encoded = {"input_ids": torch.cat([encoded["input_ids"], eos], 1)[:, -max_length:]}
            yield {k: v.to(device) for k, v in encoded.items() if k == "input_ids"}

    fisher = fisher_diagonal(model, batches())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    save_file({k: v.contiguous().cpu() for k, v in fisher.items()}, partial, metadata={"format": "pt"})
    os.replace(partial, out_path)
    return out_path
