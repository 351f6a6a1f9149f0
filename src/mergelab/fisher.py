"""Diagonal (empirical) Fisher information of a transformers causal LM, saved as safetensors
with the checkpoint's tensor names, for ``merge_method: fisher``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from mergelab.config import read_records
from mergelab.continual.state import tensor_groups, unwrap
from mergelab.errors import MergelabError
from mergelab.threads import Threads, check_threads, module_params, use_threads


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


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The log-likelihood loss of one encoded text: every token after the first, unless the
    batch carries its own ``labels``."""
    labels = batch.get("labels", batch["input_ids"])
    return model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels).loss


def fisher_diagonal(model: torch.nn.Module, batches: Iterable[Any],
                    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] = causal_lm_loss,
                    threads: Threads = "auto") -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over examples of the squared gradient of each
    example's loss (one backward per example; squaring per example is what makes it the
    Fisher and not the squared mean gradient).

    The one estimator behind ``mergelab fisher`` (Fisher merging) and EWC.

    Args:
        model: the model (put in eval mode while estimating; its mode is restored).
        batches: one example each; for a causal LM ``input_ids`` (optional
            ``attention_mask`` and ``labels``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: the causal-LM loss.
        threads: torch CPU threads, a number or "auto" (``mergelab.threads``).

    Returns:
        float32 tensors keyed by ``model.state_dict()`` names: tied parameters appear under
        every name (the same values), frozen parameters and float buffers get zeros.
    """
    groups = tensor_groups(model)  # (names, live tensor), each storage once
    trainable = [(names, t) for names, t in groups if isinstance(t, torch.nn.Parameter) and t.requires_grad]
    sums = [torch.zeros_like(t, dtype=torch.float32) for _, t in trainable]
    count = 0
    was_training = model.training
    model.eval()
    with use_threads(threads, work_params=module_params(model)):
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for total, (_, param) in zip(sums, trainable):
                if param.grad is not None:
                    total.add_(param.grad.detach().float().square())
            count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise MergelabError("no examples to estimate the Fisher from")
    by_name = {names[0]: total.div_(count) for total, (names, _) in zip(sums, trainable)}
    fisher = {}
    for names, tensor in groups:
        found = by_name.get(names[0])
        for name in names:
            fisher[name] = found.clone() if found is not None else torch.zeros(tensor.shape, dtype=torch.float32)
    order = list(unwrap(model).state_dict(keep_vars=True))
    return {name: fisher[name] for name in order if name in fisher}


def _publish(tensors: dict[str, torch.Tensor], out: Path, force: bool) -> None:
    """Write a hidden sibling, then move it into place: replacing ``out`` only with ``force``
    (a hard link refuses an existing target, so of two runs exactly one wins)."""
    from safetensors.torch import save_file

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, partial, metadata={"format": "pt"})
        if force:
            os.replace(partial, out)
        else:
            _link_no_replace(partial, out)
    except FileExistsError:
        raise MergelabError(f"{out} appeared while the Fisher was estimated (another run?); pass --force to "
                            f"replace it") from None
    except OSError as exc:
        raise MergelabError(f"cannot write {out}: {exc.strerror or exc}; nothing was written") from None
    finally:
        partial.unlink(missing_ok=True)


def _link_no_replace(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: a check, then the rename
        if target.exists():
            raise FileExistsError(target) from None
        os.replace(source, target)


def estimate_fisher(model_dir: str | Path, texts: list[str], out_path: str | Path, *, max_samples: int | None = None,
                    max_length: int = 512, device: str = "cpu", force: bool = False,
                    tokenizer: str | Path | None = None, threads: Threads = "auto") -> Path:
    """Estimate the diagonal Fisher of a causal LM on ``texts`` and save it.

    Every check a user can fail (the output path, the model directory and its tokenizer, a
    ``.bin`` checkpoint that is not plain tensors) runs before the estimate is computed.

    Args:
        tokenizer: a directory whose tokenizer to use, for a model saved without one.
        threads: torch CPU threads, a number or "auto" (``mergelab.threads``).

    Example:
        >>> estimate_fisher("experts/math", ["2 + 2 = 4", "3 + 5 = 8"], "math.fisher.safetensors")  # doctest: +SKIP
    """
    from mergelab.devices import check_device
    from mergelab.loading import load_model
    from mergelab.outdir import check_output_file

    out_path = check_output_file(out_path, force, what="Fisher file")
    device = check_device(device, "--device")
    for value, name, low in ((max_samples, "--samples", 1), (max_length, "--max-length", 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise MergelabError(f"{name} must be a whole number of at least {low}, got {value!r}")
    threads = check_threads(threads, "--threads")
    model, loaded_tokenizer = load_model(model_dir, "causal", tokenizer=tokenizer, device=device)
    texts = texts[:max_samples] if max_samples is not None else texts

    def batches():
        for text in texts:
            encoded = loaded_tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            if loaded_tokenizer.eos_token_id is not None:
                eos = torch.tensor([[loaded_tokenizer.eos_token_id]])
                encoded = {"input_ids": torch.cat([encoded["input_ids"], eos], 1)[:, -max_length:]}
            yield {k: v.to(device) for k, v in encoded.items() if k == "input_ids"}

    _publish(fisher_diagonal(model, batches(), threads=threads), out_path, force)
    return out_path
