"""Evaluate models on tasks: one model in memory at a time, results as rows (JSON/CSV)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from mergelab.devices import check_device
from mergelab.errors import MergelabError
from mergelab.outdir import check_output_file
from mergelab.evaluate.decoder import example_losses, generate, rank_choices
from mergelab.evaluate.encoder import rank_corpus
from mergelab.evaluate.metrics import RANKING_METRICS, best_over_references
from mergelab.evaluate.tasks import Task, answer_index, load_tasks, metric_k
from mergelab.loading import check_model_dir, check_vocab, load_model, model_params
from mergelab.threads import Threads, check_threads, module_params, use_threads

RESULT_FIELDS = ("model", "task", "category", "split", "kind", "metric", "score", "higher_is_better", "n")


def evaluate_task(model, tokenizer, task: Task, *, batch_size: int = 16, device=None,
                  pooling: str = "cls") -> float:
    """The task's metric for one loaded model (higher is better unless the metric is a loss).

    ``pooling`` is the default for retrieval tasks whose options don't name one."""
    options = dict(task.options)
    if task.kind == "rank_classification":
        scores = rank_choices(model, tokenizer, task.examples, batch_size=batch_size, device=device,
                              length_normalize=bool(options.get("length_normalize", False)),
                              separator=options.get("separator", " "), max_length=options.get("max_length", 2048))
        hits = [max(range(len(s)), key=s.__getitem__) == answer_index(e) for s, e in zip(scores, task.examples)]
        return sum(hits) / len(hits)
    if task.kind == "generation":
        predictions = generate(model, tokenizer, [e["input"] for e in task.examples], batch_size=batch_size,
                               max_new_tokens=int(options.get("max_new_tokens", 32)),
                               stop=options.get("stop", ["\n"]), device=device)
        values = [best_over_references(task.metric, p, e.get("outputs") or [e["output"]])
                  for p, e in zip(predictions, task.examples)]
        return sum(values) / len(values)
    if task.kind == "loss":
        losses = example_losses(model, tokenizer, task.examples, batch_size=batch_size, device=device,
                                max_length=options.get("max_length", 2048))
        if task.metric == "perplexity":  # token-weighted, as perplexity is defined
            total = sum(loss * count for loss, count in losses)
            return float(torch.tensor(total / sum(count for _, count in losses)).exp())
        return sum(loss for loss, _ in losses) / len(losses)
    name, k = metric_k(task.metric)
    rankings = rank_corpus(model, tokenizer, task.queries, task.corpus, top_k=max(k, 10), device=device,
                           pooling=options.get("pooling", pooling), batch_size=batch_size,
                           max_length=options.get("max_length", 512))
    values = [RANKING_METRICS[name](rankings[q], task.qrels[q], k) for q in task.qrels]
    return sum(values) / len(values)


def evaluate_model(model, tokenizer, tasks: Sequence[Task], *, batch_size: int = 16, device=None,
                   progress: bool = False, pooling: str = "cls", threads: Threads = "auto") -> dict[str, float]:
    """``{task name: score}`` for a loaded transformers model.

    ``threads``: torch CPU threads, a number or "auto" (``mergelab.threads.use_threads``).

    Example:
        >>> scores = evaluate_model(model, tokenizer, load_tasks("tasks.yml"))  # doctest: +SKIP
    """
    check_vocab(model, tokenizer, "model")
    model.eval()
    with use_threads(threads, work_params=module_params(model)):
        return {task.name: evaluate_task(model, tokenizer, task, batch_size=batch_size, device=device,
                                         pooling=pooling)
                for task in tqdm(tasks, desc="tasks", disable=not progress)}


def pooling_of(model_dir: str | Path) -> str:
    """The pooling a sentence-transformers directory declares (1_Pooling/config.json), else "cls"."""
    config = Path(model_dir) / "1_Pooling" / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        if settings.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def model_kind(tasks: Sequence[Task]) -> str:
    """"encoder" for retrieval tasks, else "causal"; one call evaluates one kind."""
    retrieval = {t.kind == "retrieval" for t in tasks}
    if len(retrieval) > 1:
        raise MergelabError("retrieval tasks (encoders) and decoder tasks cannot be evaluated on one model in "
                            "one call; split the tasks file")
    return "encoder" if retrieval == {True} else "causal"


def load_for_tasks(model_dir: str | Path, tasks: Sequence[Task], device: str = "cpu", dtype=torch.float32,
                   tokenizer: str | Path | None = None):
    """Load a decoder (AutoModelForCausalLM) or an encoder (AutoModel, for retrieval tasks)."""
    return load_model(model_dir, model_kind(tasks), tokenizer=tokenizer, device=device, dtype=dtype)


def evaluate_models(model_dirs: Sequence[str | Path], tasks: Sequence[Task] | str | Path, *,
                    out: str | Path | None = None, batch_size: int = 16, device: str = "cpu",
                    progress: bool = True, tokenizer: str | Path | None = None,
                    threads: Threads = "auto") -> list[dict]:
    """Evaluate several model directories (loaded one at a time) on the same tasks.

    Returns one row per (model, task) with the fields of ``RESULT_FIELDS``, and writes them
    to ``out`` (``.json`` or ``.csv``) when given. ``tokenizer``: a directory whose tokenizer
    every model uses instead of its own. ``threads``: torch CPU threads, a number or "auto"
    (chosen per model from its size and the machine's idle cores, ``mergelab.threads``).
    """
    if not isinstance(tasks, (list, tuple)):
        tasks = load_tasks(tasks)
    model_kind(tasks)
    check_run_settings(batch_size, device)
    check_threads(threads)
    if out is not None:
        check_results_path(out)
    for model_dir in model_dirs:  # fail before the first (slow) load
        check_model_dir(model_dir, tokenizer)
    rows = []
    for model_dir in model_dirs:
        with use_threads(threads, work_params=model_params(model_dir)) as count:
            model, loaded_tokenizer = load_for_tasks(model_dir, tasks, device=device, tokenizer=tokenizer)
            scores = evaluate_model(model, loaded_tokenizer, tasks, batch_size=batch_size, device=device,
                                    progress=progress, pooling=pooling_of(model_dir), threads=count)
        del model
        for task in tasks:
            rows.append({"model": str(model_dir), "task": task.name, "category": task.category, "split": task.split,
                         "kind": task.kind, "metric": task.metric, "score": scores[task.name],
                         "higher_is_better": task.higher_is_better, "n": task.size})
    if out is not None:
        write_rows(rows, out)
    return rows


def check_run_settings(batch_size: int, device) -> None:
    """A batch size below 1 or a device this machine lacks is refused before any model loads."""
    if int(batch_size) < 1:
        raise MergelabError(f"batch size must be at least 1, got {batch_size}")
    check_device(str(device))


def check_results_path(out: str | Path) -> Path:
    """Refuse, before any model is scored, a results path that cannot be written: a directory,
    or a location where no file can be created."""
    return check_output_file(out, what="results path")


def write_rows(rows: list[dict], out: str | Path, fields: Sequence[str] | None = None) -> Path:
    """Write rows as JSON (``.json``) or CSV (anything else), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    if out.suffix == ".json":
        partial.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fields or (rows[0].keys() if rows else RESULT_FIELDS)))
            writer.writeheader()
            writer.writerows(rows)
    os.replace(partial, out)
    return out
