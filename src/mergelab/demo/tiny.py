"""Saving the demo's tiny checkpoints (``mergelab.lm``'s tiny Llama and word-level tokenizer,
trained with ``mergelab.lm.train``) as ordinary Hugging Face model directories."""

from __future__ import annotations

from pathlib import Path


def save(model, tokenizer, directory: Path, max_shard_size: str | None = None) -> Path:
    """Save as an ordinary HF model directory (safetensors, config, tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    tokenizer.save_pretrained(directory)
    return directory
