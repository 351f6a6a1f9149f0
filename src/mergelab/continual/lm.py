"""Task streams for transformers causal LMs: load the spec's model and tasks, train with the
stream runner, write results.json, results.md and the task-plane plot.

Tasks are ``{"input": ..., "output": ...}`` examples; the model learns the output given the
input (loss on the output tokens and EOS only, ``mergelab.lm.encode``, cut between input and
output exactly where the scorers cut).

The default score is answer-token accuracy (teacher-forced: the share of output tokens the
model predicts exactly). It lives in ``make_evaluator``, the one function to replace when a
richer evaluator (e.g. ``mergelab.evaluate``) should score the stream; ``run_spec`` also takes
any ``evaluator(model, tokenizer, tasks) -> {task: score}``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mergelab.continual.report import (model_title, plane_panels, save_plane_figure, stream_table, write_json,
                                       write_outputs)
from mergelab.continual.spec import StreamSpec, TaskSpec, load_stream_spec
from mergelab.continual.stream import Harness, StreamTask, run_stream
from mergelab.devices import check_device
from mergelab.config import read_records
from mergelab.errors import MergelabError
from mergelab.lm import SKILLS, answer_accuracy, build_tokenizer, causal_lm_loss, Encoder, make_examples, tiny_llama
from mergelab.threads import Threads, check_threads

Evaluator = Callable[[torch.nn.Module, Any, list[StreamTask]], dict[str, float]]


def read_examples(path: str | Path) -> list[dict[str, str]]:
    """``{"input", "output"}`` examples from a JSON list or a JSONL file."""
    path = Path(path)
    items = read_records(path, "task file")
    if not isinstance(items, list):
        raise MergelabError(f"{path} must hold a list of examples (JSON list or JSONL)")
    for number, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("input"), str) and isinstance(item.get("output"), str)):
            raise MergelabError(f"{path}: example {number} must be an object with string fields 'input' and 'output'")
    if not items:
        raise MergelabError(f"{path} holds no examples")
    return [{"input": item["input"], "output": item["output"]} for item in items]


def load_task(spec: StreamSpec, task: TaskSpec, index: int) -> StreamTask:
    if task.demo is not None:
        if task.demo not in SKILLS:
            raise MergelabError(f"task '{task.name}': demo skill '{task.demo}' is unknown; choose one of: "
                                f"{', '.join(SKILLS)}")
        return StreamTask(task.name, make_examples(task.demo, task.train_size, spec.seed + index),
                    make_examples(task.demo, task.eval_size, spec.seed + index + 1000))
    if task.train is not None:
        if task.eval is None:
            raise MergelabError(f"task '{task.name}' has train but no eval file; add eval: (or use data: with "
                             f"eval_fraction)")
        return StreamTask(task.name, read_examples(spec.resolve(task.train)), read_examples(spec.resolve(task.eval)))
    examples = read_examples(spec.resolve(task.data))
    random.Random(f"{spec.seed}:{task.name}").shuffle(examples)
    held_out = max(1, round(task.eval_fraction * len(examples)))
    if held_out >= len(examples):
        raise MergelabError(f"task '{task.name}': {len(examples)} examples are too few to hold out "
                         f"{task.eval_fraction:.0%} for evaluation")
    return StreamTask(task.name, examples[held_out:], examples[:held_out])


def load_model(spec: StreamSpec):
    """(model, tokenizer): the tiny Llama of ``mergelab.lm`` for ``model: tiny``, else a local HF
    causal-LM directory (through ``mergelab.loading``, the one model loader)."""
    if spec.model == "tiny":
        return tiny_llama(seed=spec.seed), build_tokenizer()
    from mergelab.loading import load_model as load_causal_lm

    path = spec.resolve(spec.model)
    if not path.is_dir():
        raise MergelabError(f"model '{spec.model}' is neither 'tiny' nor a local model directory; check the path")
    model, tokenizer = load_causal_lm(path, "causal", tokenizer=spec.resolve(spec.tokenizer) if spec.tokenizer
                                      else None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise MergelabError(f"the tokenizer of '{spec.model}' needs BOS and EOS tokens to frame the examples")
    return model, tokenizer


def make_evaluator(tokenizer, tasks: list[StreamTask], batch_size: int = 64) -> Callable[[torch.nn.Module, int], dict]:
    """The stream's evaluator: answer-token accuracy on every task's eval examples."""
    return lambda model, stage: {task.name: answer_accuracy(model, tokenizer, list(task.eval), batch_size)
                                 for task in tasks}


def evaluate_tasks_evaluator(spec: StreamSpec, tasks: list[StreamTask]) -> Evaluator:
    """``mergelab.evaluate`` on the spec's ``evaluation`` tasks file, one task per stream task."""
    from mergelab.evaluate import evaluate_model, load_tasks

    eval_tasks = load_tasks(spec.resolve(spec.evaluation))
    by_name = {task.name: task for task in eval_tasks}
    for task in tasks:
        if task.name not in by_name:
            raise MergelabError(f"evaluation file {spec.evaluation} has no task named '{task.name}'; name one task "
                             f"after each task of the stream")
        if not by_name[task.name].higher_is_better:
            raise MergelabError(f"evaluation task '{task.name}' uses {by_name[task.name].metric}, where lower is "
                             f"better; forgetting and the plots need a score where higher is better")
    chosen = [by_name[task.name] for task in tasks]
    return lambda model, tokenizer, _: evaluate_model(model, tokenizer, chosen, batch_size=spec.eval_batch_size)


def lm_harness(tokenizer, tasks: list[StreamTask], device: str,
               evaluate: Callable[[torch.nn.Module, int], dict]) -> Harness:
    encoder = Encoder(tokenizer)  # every example tokenized once for the whole stream
    return Harness(
        loss=causal_lm_loss,
        collate=lambda examples: {k: v.to(device) for k, v in encoder(examples).items()},
        evaluate=evaluate,
    )


def run_spec(spec_source: str | Path | dict, out_dir: str | Path, force: bool = False, quiet: bool = False,
             evaluator: Evaluator | None = None, threads: Threads = "auto") -> Path:
    """Run the stream a spec describes and write ``results.json``, ``results.md`` and
    ``task_plane.png`` into ``out_dir`` (which appears only when all of them are written).

    Args:
        spec_source: a YAML file path or a dict (see ``mergelab.continual.spec``).
        evaluator: ``evaluator(model, tokenizer, tasks) -> {task name: score}``; default: the
            spec's ``evaluation`` tasks file through ``mergelab.evaluate`` if given, else
            answer-token accuracy.
        threads: torch CPU threads, a number or "auto" (``mergelab.threads``); "auto" takes the
            spec's ``threads:`` when it has one.

    Example:
        >>> run_spec("examples/sfa_tiny.yml", "sfa-out")  # doctest: +SKIP
    """
    from mergelab.io import check_output_dir

    spec = load_stream_spec(spec_source)
    threads = check_threads(threads)
    check_output_dir(out_dir, force)  # fail before training, not after
    log = (lambda _: None) if quiet else print
    started = time.perf_counter()
    device = check_device(spec.device, "device")
    tasks = [load_task(spec, task, index) for index, task in enumerate(spec.tasks)]
    model, tokenizer = load_model(spec)
    model.to(device)
    if evaluator is None and spec.evaluation is not None:
        evaluator = evaluate_tasks_evaluator(spec, tasks)
    evaluate = make_evaluator(tokenizer, tasks, spec.eval_batch_size) if evaluator is None else \
        (lambda m, stage: evaluator(m, tokenizer, tasks))
    log(f"stream of {len(tasks)} tasks ({', '.join(t.name for t in tasks)}) on {spec.model}, "
        f"{len(spec.all_methods())} runs")
    result = run_stream(model, tasks, spec.all_methods(), spec.settings(),
                        lm_harness(tokenizer, tasks, device, evaluate), log=log,
                        threads=spec.threads if threads == "auto" and spec.threads else threads)
    result["spec"] = spec.model_dump(mode="json", by_alias=True, exclude={"source_dir"})
    result["seconds"] = time.perf_counter() - started
    panels = plane_panels(result["runs"])
    write_outputs(out_dir, {
        "results.json": write_json(result),
        "results.md": lambda path: path.write_text(f"# Task stream: {' → '.join(result['tasks'])}\n\n"
                                                   + stream_table(result)),
        "task_plane.png": lambda path: save_plane_figure(path, result, panels,
                                                         f"{model_title(spec.model)}: task plane"),
    }, force)
    log(stream_table(result))
    log(f"done in {result['seconds']:.0f} s; results in {out_dir}")
    return Path(out_dir)
