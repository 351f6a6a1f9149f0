"""AdaMerging (Yang et al. ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning").

Task arithmetic θ = θ_b + Σ_i λ_i τ_i with the coefficients λ learned, not chosen: Adam
minimizes the Shannon entropy of the merged model's predictions on unlabeled inputs of the
tasks, summed over the tasks. Task-wise AdaMerging learns one λ per task; layer-wise one per
task and group of tensors, a group being a transformer block (``model.layers.7.``) or a
tensor outside the blocks (embeddings, final norm, lm_head: each its own group). For a causal
LM the predictions are next-token distributions on the task inputs (the prompts, no labels):
by default (``positions="last"``) the one that follows each input, over the first tokens of
the record's options where it has them (a rank-classification task's classes, as the paper's
classifiers predict over their task's classes) and over the vocabulary otherwise; with
``positions="all"``, at every token of the input, over the vocabulary. Every λ starts at 0.3,
the paper's initialisation.

The merged model θ_b + Σ λ τ is built with ``torch.func.functional_call`` at each step, so
the base and the N task vectors are held in memory: models over ``max_params`` parameters
are refused. The output is an ordinary merge: the learned λ become a ``task_arithmetic``
config (per-model weights; layer-wise through ``{filter, value}`` entries) that the engine
runs and stores as ``mergelab_config.yml``, so ``mergelab merge`` repeats it exactly; the
λ and the entropy curve go into the model card and ``adamerging.json``.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mergelab.errors import MergelabError
from mergelab.threads import Threads

DEFAULTS: dict[str, Any] = {"mode": "task", "positions": "last", "steps": 500, "lr": 1e-3, "init": 0.3, "examples": 256,
                            "batch_size": 16, "max_length": 512, "max_params": 200_000_000}
MODES = ("task", "layer")
POSITIONS = ("last", "all")
_BLOCK = re.compile(r"\.(\d+)\.")  # the block index of a tensor name, as mergelab.config.layer_index reads it


@dataclass
class AdaMergingResult:
    """What AdaMerging learned: ``lambdas[i][g]`` is expert i's λ for group ``groups[g]``;
    ``entropy`` the summed mean entropy of the step's batches before each step (then after the
    last); ``entropy_before``/``entropy_after`` over every input at λ = init and at the learned λ."""

    out_dir: str | None
    mode: str
    groups: list[str]
    lambdas: list[list[float]]
    entropy: list[float]
    entropy_before: float
    entropy_after: float
    config: dict


def check_settings(mode: str = DEFAULTS["mode"], positions: str = DEFAULTS["positions"],
                   steps: int = DEFAULTS["steps"], lr: float = DEFAULTS["lr"],
                   init: float = DEFAULTS["init"], examples: int = DEFAULTS["examples"],
                   batch_size: int = DEFAULTS["batch_size"], max_length: int = DEFAULTS["max_length"],
                   max_params: int = DEFAULTS["max_params"]) -> None:
    """Refuse a bad setting with one line naming it (before any model is loaded)."""
    if mode not in MODES:
        raise MergelabError(f"adamerging mode '{mode}' is not known; use task (one λ per model) or layer "
                            f"(one per model and block)")
    if positions not in POSITIONS:
        raise MergelabError(f"adamerging positions '{positions}' is not known; use last (the prediction that "
                            f"follows each input) or all (every token of the inputs)")
    for value, name, low in ((steps, "steps", 1), (examples, "examples", 1), (batch_size, "batch_size", 1),
                             (max_length, "max_length", 2), (max_params, "max_params", 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MergelabError(f"adamerging {name} must be a whole number of at least {low}, got {value!r}")
    for value, name in ((lr, "lr"), (init, "init")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MergelabError(f"adamerging {name} must be a number, got {value!r}")
    if lr <= 0:
        raise MergelabError(f"adamerging lr must be positive, got {lr!r}")


def group_of(name: str, mode: str) -> str:
    """The λ group of a tensor: "all" task-wise; layer-wise its block prefix (``model.layers.3.``)
    or, outside the blocks, its module (``model.embed_tokens.``)."""
    if mode == "task":
        return "all"
    match = _BLOCK.search(name)
    return name[:match.end()] if match else name.rsplit(".", 1)[0] + "."


def adamerging(base: str | Path, experts: Sequence[tuple[str | Path, str | Path]], out: str | Path | None, *,
               mode: str = DEFAULTS["mode"], positions: str = DEFAULTS["positions"],
               steps: int = DEFAULTS["steps"], lr: float = DEFAULTS["lr"],
               init: float = DEFAULTS["init"], examples: int = DEFAULTS["examples"],
               batch_size: int = DEFAULTS["batch_size"], max_length: int = DEFAULTS["max_length"],
               max_params: int = DEFAULTS["max_params"], seed: int = 0, device: str = "cpu", force: bool = False,
               quiet: bool = False, threads: Threads = "auto") -> AdaMergingResult:
    """Learn the merge coefficients on the experts' unlabeled inputs and write the merged model.

    Args:
        base: the model the experts were fine-tuned from (a causal LM directory).
        experts: (model directory, task file) per expert; the task file's ``input`` fields are
            the unlabeled inputs (``mergelab.data_aware.task_records``).
        out: the merged model directory (published whole, or not at all); None: learn only.
        mode: "task" (one λ per expert) or "layer" (one per expert and group).
        steps, lr: Adam's fixed number of steps and learning rate.
        init: every λ's starting value (the paper's 0.3).
        examples: inputs per expert; batch_size: inputs per expert in each step's batch (drawn
            with ``seed``).
        max_params: refuse models with more parameters (base + N task vectors stay in memory).

    Example:
        >>> adamerging("base", [("experts/add", "data/add.jsonl"), ("experts/copy", "data/copy.jsonl")],
        ...            "merged", mode="layer", steps=200)  # doctest: +SKIP
    """
    from mergelab.data_aware import task_records
    from mergelab.devices import check_device
    from mergelab.loading import check_model_dir, model_params
    from mergelab.outdir import check_output_dir
    from mergelab.threads import check_threads, use_threads

    check_settings(mode, positions, steps, lr, init, examples, batch_size, max_length, max_params)
    if not experts:
        raise MergelabError("adamerging needs at least one expert model with its data file")
    device = check_device(device, "--device")
    threads = check_threads(threads, "--threads")
    models = [str(model) for model, _ in experts]
    if out is not None:
        check_output_dir(out, force, inputs=[base, *models])
    for path, what in [(base, "base model")] + [(m, "expert model") for m in models]:
        check_model_dir(path, what=what)
    size = model_params(base)
    if size is not None and size > max_params:
        raise MergelabError(f"adamerging holds the base and {len(experts)} task vectors in memory; base model {base} "
                            f"has {size:,} parameters, over max_params {max_params:,}; raise max_params (about "
                            f"{(len(experts) + 2) * size * 4 / 1e9:.1f} GB) or choose another method")
    records = [task_records(data, examples) for _, data in experts]

    model, tokenizer, names, anchor, task_vectors = _load(base, models, device)
    groups = list(dict.fromkeys(group_of(name, mode) for name in names))
    index = torch.tensor([groups.index(group_of(name, mode)) for name in names])
    batches = [_encode(tokenizer, rows, max_length) for rows in records]
    lambdas = torch.full((len(experts), len(groups)), float(init), device=device, requires_grad=True)

    def merged_params() -> dict[str, torch.Tensor]:
        return {name: anchor[k] + sum(lambdas[i, index[k]] * task_vectors[i][k] for i in range(len(experts)))
                for k, name in enumerate(names)}

    def entropy(params, chosen: list[list[int]] | None) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for t, (input_ids, mask, allowed) in enumerate(batches):
            rows = slice(None) if chosen is None else chosen[t]
            total = total + _mean_entropy(model, params, input_ids[rows].to(device), mask[rows].to(device),
                                          allowed[rows].to(device), positions)
        return total

    rng = random.Random(f"adamerging:{seed}")
    optimizer = torch.optim.Adam([lambdas], lr=lr)
    curve: list[float] = []
    from tqdm.auto import tqdm

    with use_threads(threads, work_params=size or 0):
        with torch.no_grad():
            before = float(entropy(merged_params(), None))
        for _ in tqdm(range(steps), desc="adamerging", unit="step", disable=quiet):
            chosen = [rng.sample(range(len(ids)), min(batch_size, len(ids))) for ids, _, _ in batches]
            loss = entropy(merged_params(), chosen)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(float(loss.detach()))
        with torch.no_grad():
            after = float(entropy(merged_params(), None))
    learned = lambdas.detach().cpu().tolist()
    config = merge_config(base, models, groups, learned, mode)
    result = AdaMergingResult(None if out is None else str(out), mode, groups, learned, curve, before, after, config)
    if out is not None:
        _write(result, [str(data) for _, data in experts], dict(steps=steps, lr=lr, init=init, examples=examples,
                                                                 batch_size=batch_size, seed=seed), force, quiet)
    return result


def merge_config(base: str | Path, models: list[str], groups: list[str], lambdas: list[list[float]],
                 mode: str) -> dict:
    """The ``task_arithmetic`` config θ_b + Σ λ τ for learned ``lambdas`` (expert × group)."""
    entries = []
    for model, row in zip(models, lambdas):
        if mode == "task":
            weight: Any = row[0]
        else:  # one {filter, value} per group; a tensor outside every group (a stored tied copy) takes the mean
            weight = [{"filter": group, "value": value} for group, value in zip(groups, row)]
            weight.append({"filter": "*", "value": sum(row) / len(row)})
        entries.append({"model": model, "parameters": {"weight": weight}})
    return {"merge_method": "task_arithmetic", "base_model": str(base), "models": entries,
            "parameters": {"lambda": 1.0}}


def _load(base, models: list[str], device):
    """The base model (frozen), its parameter names, their values, and each expert's task vectors."""
    from mergelab.io import CheckpointReader
    from mergelab.loading import load_model

    model, tokenizer = load_model(base, "causal", device=device, what="base model")
    model.requires_grad_(False)
    named = dict(model.named_parameters())  # tied parameters once (functional_call ties them back)
    names = list(named)
    anchor = [named[name].detach() for name in names]
    task_vectors = []
    for path in models:
        with CheckpointReader(Path(path), label=path) as reader:
            vectors = []
            for name, value in zip(names, anchor):
                info = reader.tensors.get(name)
                if info is None or tuple(info.shape) != tuple(value.shape):
                    found = "missing" if info is None else f"of shape {tuple(info.shape)}"
                    raise MergelabError(f"expert model {path}: tensor '{name}' is {found}, the base has "
                                        f"{tuple(value.shape)}; every expert must be a fine-tune of the base")
                vectors.append(reader.get(name).to(device=device, dtype=value.dtype) - value)
            task_vectors.append(vectors)
    return model, tokenizer, names, anchor, task_vectors


def _encode(tokenizer, records: list[dict], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of the inputs, right-padded, and per input the tokens its
    prediction ranges over: the first token of each option (as the scorer splits them) for a
    rank-classification record, the whole vocabulary otherwise (B, V)."""
    from mergelab.evaluate.decoder import ensure_pad_token, pad, split_encode

    rows = [tokenizer(record["input"])["input_ids"][:max_length] for record in records]
    input_ids, mask = pad(rows, ensure_pad_token(tokenizer))
    allowed = torch.ones(len(records), len(tokenizer), dtype=torch.bool)
    for row, record in enumerate(records):
        firsts = [split_encode(tokenizer, record["input"], option)[1][:1] for option in record.get("options", [])]
        if firsts and all(firsts):
            allowed[row] = False
            allowed[row, [ids[0] for ids in firsts]] = True
    return input_ids, mask, allowed


def _mean_entropy(model, params: dict[str, torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor,
                  allowed: torch.Tensor, positions: str) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the next-token distributions at each input's last token
    ("last"; over the ``allowed`` tokens, a classifier's classes) or at every non-padding token
    ("all", over the vocabulary)."""
    from torch.func import functional_call

    logits = functional_call(model, params, (), {"input_ids": input_ids, "attention_mask": mask}).logits
    logits = logits[..., :allowed.shape[-1]].float()  # (B, L, V); rows past the tokenizer's never occur
    if positions == "last":  # right-padded: the last real token of each row, over its options
        logits = logits[torch.arange(len(logits)), mask.sum(1) - 1].masked_fill(~allowed, float("-inf"))
        logits, mask = logits.unsqueeze(1), torch.ones(len(logits), 1, dtype=mask.dtype, device=mask.device)
        allowed = allowed.unsqueeze(1)  # (B, 1, V)
    else:
        allowed = torch.ones_like(logits, dtype=torch.bool)
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p.masked_fill(~allowed, 0.0)).sum(-1)  # (B, L)
    weights = mask.to(entropy.dtype)
    return (entropy * weights).sum() / weights.sum()


def _write(result: AdaMergingResult, data: list[str], settings: dict, force: bool, quiet: bool) -> None:
    """The merged model (the engine runs the learned config), then λ and the curve in the card."""
    import os

    from mergelab.engine import run_merge
    from mergelab.modelcard import append_card_section
    from mergelab.outdir import atomic_directory

    models = [entry["model"] for entry in result.config["models"]]
    with atomic_directory(result.out_dir, force, inputs=[result.config["base_model"], *models]) as tmp:
        merged = run_merge(result.config, tmp / "merged", quiet=quiet)
        for item in merged.iterdir():
            os.rename(item, tmp / item.name)
        merged.rmdir()
        (tmp / "adamerging.json").write_text(json.dumps({**asdict(result), "data": data, "settings": settings},
                                                        indent=2) + "\n")
        append_card_section(tmp, "AdaMerging", _card_text(result, models, data, settings))


def _card_text(result: AdaMergingResult, models: list[str], data: list[str], settings: dict) -> str:
    header = "| model | data | " + " | ".join(f"`{g}`" for g in result.groups) + " |"
    rows = [f"| `{m}` | `{d}` | " + " | ".join(f"{v:.4f}" for v in row) + " |"
            for m, d, row in zip(models, data, result.lambdas)]
    every = max(1, len(result.entropy) // 20)
    curve = ", ".join(f"{step + 1}: {value:.4f}" for step, value in enumerate(result.entropy)
                      if step % every == 0 or step == len(result.entropy) - 1)
    return (
        f"The weights of the task_arithmetic configuration above were learned by {result.mode}-wise AdaMerging "
        f"(Yang et al. ICLR 2024): Adam on the summed entropy of the merged model's next-token predictions on "
        f"each model's unlabeled inputs, λ starting at {settings['init']}, {settings['steps']} steps at lr "
        f"{settings['lr']}, {settings['batch_size']} of {settings['examples']} inputs per model per step, seed "
        f"{settings['seed']}.\n\nEntropy over every input: {result.entropy_before:.4f} at λ = {settings['init']}, "
        f"{result.entropy_after:.4f} at the learned λ.\n\nLearned λ:\n\n{header}\n"
        f"|{'---|' * (len(result.groups) + 2)}\n" + "\n".join(rows) + f"\n\nEntropy of each step's batch (step: "
        f"nats): {curve}\n"
    )
