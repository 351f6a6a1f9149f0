"""Optional adapters (``pip install 'mergelab[harness]'``): run lm-evaluation-harness or MTEB on a
model directory and ingest their numbers as rows of ``RESULT_FIELDS``.

Our tasks run offline: lm-eval reads them as YAML + JSONL (``dataset_path: json``) written to a
temporary folder, MTEB as in-memory retrieval tasks. Task *names* of either harness download their
datasets from the Hugging Face Hub (unless an lm-eval YAML of yours points at local files).
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import yaml

from mergelab.errors import MergelabError
from mergelab.evaluate.runner import (RESULT_FIELDS, check_results_path, check_run_settings, evaluate_models,
                                      write_rows)
from mergelab.loading import check_model_dir, first_line, model_params, quiet_transformers
from mergelab.threads import Threads, check_threads, use_threads
from mergelab.evaluate.tasks import Task, answer_index, load_tasks, metric_k

BACKENDS = ("mergelab", "lm-eval", "mteb")
_STRIP = "strip"  # our lm-eval filter's name, dropped from metric names like lm-eval's "none"
_MTEB_AT_K = re.compile(r"^(ndcg|mrr|recall|map|precision|hit_rate)_at_(\d+)$")
_MTEB_LOWER_IS_BETTER = {"mae", "mse", "rmse"}


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MergelabError(f"{package} is not installed; it comes with mergelab's 'harness' extra: "
                         f"pip install 'mergelab[harness]'") from None


@contextmanager
def _quiet():
    """lm-eval, MTEB and datasets chatter: INFO logs, deprecation warnings, per-split progress bars,
    transformers' "Loading weights" bars."""
    import datasets

    loggers = {logging.getLogger(name): logging.getLogger(name).level for name in ("lm_eval", "mteb")}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            for logger in loggers:
                logger.setLevel(logging.WARNING)
            yield
    finally:
        for logger, level in loggers.items():
            logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _row(model, task, category, split, kind, metric, score, higher_is_better, n) -> dict:
    values = (str(model), task, category, split, kind, metric, float(score), bool(higher_is_better), n)
    return dict(zip(RESULT_FIELDS, values))


def _check_model_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise MergelabError(f"model directory {path} does not exist")
    return path


# -- lm-evaluation-harness

def lm_eval_config(task: Task, data_file: Path, name: str) -> dict:
    """The lm-eval YAML config (as a dict) of one of our tasks whose examples are in ``data_file``."""
    config = {"task": name, "dataset_path": "json", "test_split": "test", "doc_to_text": "input",
              "dataset_kwargs": {"data_files": {"test": str(data_file)},
                                 "cache_dir": str(data_file.parent / "hf_cache")}}
    if task.kind == "rank_classification":
        # lm-eval's acc_norm divides by the option's length in characters, ours by its tokens
        metric = "acc_norm" if task.options.get("length_normalize") else "acc"
        config.update(output_type="multiple_choice", doc_to_choice="options", doc_to_target="answer",
                      target_delimiter=task.options.get("separator", " "),
                      metric_list=[{"metric": metric, "aggregation": "mean", "higher_is_better": True}])
    elif task.kind == "generation" and task.metric == "exact_match":
        config.update(output_type="generate_until", doc_to_target="outputs",
                      generation_kwargs={"until": list(task.options.get("stop", ["\n"])), "do_sample": False,
                                         "max_gen_toks": int(task.options.get("max_new_tokens", 32))},
                      filter_list=[{"name": _STRIP, "filter": [{"function": "remove_whitespace"},
                                                               {"function": "take_first"}]}],
                      metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                    "ignore_case": True, "ignore_punctuation": True}])
    else:
        what = f"metric {task.metric}" if task.kind == "generation" else f"kind {task.kind}"
        hint = "run_mteb (--backend mteb)" if task.kind == "retrieval" else "the mergelab backend"
        raise MergelabError(f"task '{task.name}' has {what}, which the lm-eval adapter does not convert (it takes "
                         f"rank_classification, and generation with exact_match); evaluate it with {hint}")
    return config


def write_lm_eval_tasks(tasks: Sequence[Task], folder: str | Path) -> dict[str, Task]:
    """Write each task as ``<name>.yaml`` + ``<name>.jsonl`` in ``folder``; ``{lm-eval name: task}``."""
    written = {}
    for number, task in enumerate(tasks):
        name = f"mergelab_{number}_{re.sub(r'[^A-Za-z0-9]+', '_', task.name)}"  # unique, and a valid lm-eval name
        config = lm_eval_config(task, Path(folder) / f"{name}.jsonl", name)
        if task.kind == "rank_classification":  # answers may be option strings; lm-eval wants indices
            records = [{"input": e["input"], "options": [str(o) for o in e["options"]], "answer": answer_index(e)}
                       for e in task.examples]
        else:
            records = [{"input": e["input"], "outputs": [str(o) for o in e.get("outputs") or [e["output"]]]}
                       for e in task.examples]
        (Path(folder) / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (Path(folder) / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        written[name] = task
    return written


def _task_manager(names: list[str], include_paths: list[str]):
    """A TaskManager that knows ``names``; lm-eval's own ~15k tasks are indexed only when needed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_paths, include_defaults=False) if include_paths else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include_paths or None)
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "is it in the include_path (--lm-eval-include)?"
            raise MergelabError(f"lm-eval has no task '{name}'; {hint}")
    return manager


def run_lm_eval(model_dir: str | Path, tasks: Sequence[Task | str], *, include_path: str | Path | None = None,
                batch_size: int = 8, device: str = "cpu", limit: int | float | None = None) -> list[dict]:
    """Run lm-evaluation-harness (``hf`` model, float32) on a causal-LM directory.

    Args:
        model_dir: a transformers causal-LM directory (a merge's output).
        tasks: our ``Task`` objects (rank_classification -> multiple_choice / acc; generation with
            exact_match -> generate_until / exact_match ignoring case, punctuation and surrounding
            whitespace), lm-eval task names, or both.
        include_path: a folder of your own lm-eval YAML tasks, for the names.
        batch_size, device, limit: as lm-eval takes them (``limit``: examples per task, or a fraction).

    Returns:
        Rows of ``RESULT_FIELDS``, kind "lm_eval": category and split from our tasks, else
        "lm_eval" / "held_out"; lm-eval's metric names without the ",none" suffix (other filters
        stay: "exact_match,strict-match"); n is the number of examples scored.

    Example:
        >>> rows = run_lm_eval("merged/", load_tasks("tasks.yml"))  # doctest: +SKIP
        >>> rows = run_lm_eval("merged/", ["my_task"], include_path="my_lm_eval_tasks/")  # doctest: +SKIP
    """
    lm_eval = _require("lm_eval", "lm-eval")
    model_dir = _check_model_dir(model_dir)
    names = [t for t in tasks if isinstance(t, str)]
    with tempfile.TemporaryDirectory(prefix="mergelab-lm-eval-") as folder, _quiet():
        ours = write_lm_eval_tasks([t for t in tasks if isinstance(t, Task)], folder)
        include = ([folder] if ours else []) + ([str(include_path)] if include_path else [])
        manager = _task_manager(names, include)
        try:
            results = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                tasks=list(ours) + names, task_manager=manager, batch_size=batch_size, device=device,
                limit=limit, log_samples=False, bootstrap_iters=0)
        except OSError as exc:
            raise MergelabError(f"lm-eval could not run on {model_dir}: {first_line(exc)} (tasks named without "
                                f"include_path download their datasets from the Hugging Face Hub)") from None
    return lm_eval_rows(results, model_dir, ours)


def lm_eval_rows(results: dict, model: str | Path, ours: dict[str, Task] | None = None) -> list[dict]:
    """Rows of ``RESULT_FIELDS`` from the dict ``lm_eval.simple_evaluate`` returns."""
    ours = ours or {}
    rows = []
    for name, values in results["results"].items():
        task = ours.get(name)
        better = results.get("higher_is_better", {}).get(name, {})
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        for key, score in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or isinstance(score, bool) \
                    or not isinstance(score, (int, float)):
                continue
            label = metric if filter_name in ("none", _STRIP) else key
            rows.append(_row(model, task.name if task else name, task.category if task else "lm_eval",
                             task.split if task else "held_out", "lm_eval", label, score,
                             better.get(metric, True), task.size if task and n is None else n))
    return rows


# -- MTEB

def _local_retrieval_task(task: Task):
    """One of our retrieval tasks as an MTEB retrieval task (corpus, queries, qrels in memory)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    qrels = {q: {d: int(r) for d, r in docs.items()} for q, docs in task.qrels.items()}
    if any(int(r) != r for docs in task.qrels.values() for r in docs.values()):
        raise MergelabError(f"task '{task.name}': MTEB (pytrec_eval) takes integer relevance grades only")
    _, k = metric_k(task.metric)

    class LocalRetrieval(AbsTaskRetrieval):
        k_values = tuple(sorted({*AbsTaskRetrieval.k_values, k}))
        metadata = TaskMetadata(  # eval_langs, category etc. are required labels; they do not change scores
            name=f"mergelab-{task.name}", type="Retrieval", main_score="ndcg_at_10", description=task.name,
            reference=None, dataset={"path": "local", "revision": "local"}, category="t2t", eval_splits=["test"],
            eval_langs=["eng-Latn"], modalities=["text"], date=None, domains=None, task_subtypes=None,
            license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)

        def load_data(self, num_proc=None, **kwargs) -> None:
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": text} for q, text in task.queries.items()]),
                corpus=Dataset.from_list([{"id": d, "text": text} for d, text in task.corpus.items()]),
                relevant_docs=qrels, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


def run_mteb(model_dir: str | Path, tasks: Sequence[Task | str], *, batch_size: int = 32,
             device: str = "cpu") -> list[dict]:
    """Run MTEB on a model directory loaded with ``SentenceTransformer``.

    Args:
        model_dir: a sentence-transformers directory (a plain transformers encoder gets mean
            pooling here, where mergelab's own evaluator defaults to CLS).
        tasks: our retrieval ``Task`` objects (run offline), MTEB task names (downloaded), or both.
        batch_size, device: for encoding.

    Returns:
        Rows of ``RESULT_FIELDS``, kind "mteb": one per task of ours, with its metric ("ndcg@10",
        "mrr@10", "recall@5"...); for names, every metric of ``mteb_result_rows``.

    Example:
        >>> rows = run_mteb("merged-encoder/", load_tasks("retrieval.yml"))  # doctest: +SKIP
    """
    mteb = _require("mteb", "mteb")
    sentence_transformers = _require("sentence_transformers", "sentence-transformers")
    model_dir = _check_model_dir(model_dir)
    ours = {f"mergelab-{t.name}": t for t in tasks if isinstance(t, Task)}
    for task in ours.values():
        if task.kind != "retrieval":
            raise MergelabError(f"task '{task.name}' has kind {task.kind}; the MTEB adapter runs retrieval tasks only")
    names = [t for t in tasks if isinstance(t, str)]
    try:
        named = list(mteb.get_tasks(tasks=names)) if names else []
    except KeyError as exc:
        raise MergelabError(f"MTEB does not know task(s) {', '.join(names)}: {first_line(exc)}") from None
    mteb_tasks = [_local_retrieval_task(t) for t in ours.values()] + named
    with _quiet():
        model = sentence_transformers.SentenceTransformer(str(model_dir), device=device)
        try:
            result = mteb.evaluate(model, mteb_tasks, cache=None, encode_kwargs={"batch_size": batch_size},
                                   show_progress_bar=False, co2_tracker=False)
        except OSError as exc:
            raise MergelabError(f"MTEB could not load a dataset ({first_line(exc)}); MTEB task names download their "
                                f"data from the Hugging Face Hub, so they need network access or a filled HF "
                                f"cache") from None
    rows = []
    for task_result in result.task_results:
        task_rows = mteb_result_rows(task_result.to_dict(), model_dir)
        task = ours.get(task_result.task_name)
        if task is not None:  # our task: its one metric, labelled like our own evaluator's row
            task_rows = [dict(r, task=task.name, category=task.category, split=task.split, n=task.size)
                         for r in task_rows if r["metric"] == task.metric]
        rows += task_rows
    return rows


def mteb_result_rows(result: dict, model: str | Path) -> list[dict]:
    """Rows of ``RESULT_FIELDS`` from one MTEB result (a TaskResult's dict or JSON file).

    "ndcg_at_10" becomes "ndcg@10" (likewise mrr, recall, map, precision, hit_rate), other scores
    keep their names, "main_score" (a duplicate) and "nauc_*" are left out. The task is named
    "Task", plus "/<split>" unless the split is test and "/<subset>" unless it is default.
    """
    rows = []
    for split, entries in result["scores"].items():
        for entry in entries:
            subset = entry.get("hf_subset", "default")
            parts = [result["task_name"]] + [split] * (split != "test") + [subset] * (subset != "default")
            for key, score in entry.items():
                if key == "main_score" or key.startswith("nauc_") or isinstance(score, bool) \
                        or not isinstance(score, (int, float)):
                    continue
                match = _MTEB_AT_K.match(key)
                metric = f"{match[1]}@{match[2]}" if match else key
                rows.append(_row(model, "/".join(parts), "mteb", "held_out", "mteb", metric, score,
                                 metric not in _MTEB_LOWER_IS_BETTER, None))
    return rows


def ingest_mteb_results(path: str | Path, model: str | None = None) -> list[dict]:
    """Rows of ``RESULT_FIELDS`` from MTEB result JSON files you already have (no MTEB needed).

    Args:
        path: a result file, or a folder searched recursively (MTEB's ``<model>/<revision>/<Task>.json``).
        model: the model column; default: the name in a ``model_meta.json`` beside each file, else its folder.

    Returns:
        ``mteb_result_rows`` of every file (n, not recorded by MTEB, is None).

    Example:
        >>> rows = ingest_mteb_results("results/")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise MergelabError(f"MTEB results {path} do not exist")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*.json") if f.name != "model_meta.json")
    rows = []
    for file in files:
        try:
            result = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise MergelabError(f"{file} is not JSON ({first_line(exc)})") from None
        if not isinstance(result, dict) or not isinstance(result.get("scores"), dict) or "task_name" not in result:
            raise MergelabError(f"{file} is not an MTEB result file (it needs 'task_name' and 'scores')")
        meta = file.parent / "model_meta.json"
        name = model or (json.loads(meta.read_text()).get("name") if meta.is_file() else None) or str(file.parent)
        rows += mteb_result_rows(result, name)
    return rows


def evaluate_with_backend(model_dirs: Sequence[str | Path], tasks: Sequence[Task] | str | Path | None = None, *,
                          backend: str = "mergelab", lm_eval_tasks: Sequence[str] = (),
                          lm_eval_include: str | Path | None = None, out: str | Path | None = None,
                          batch_size: int = 16, device: str = "cpu", progress: bool = True,
                          tokenizer: str | Path | None = None, threads: Threads = "auto") -> list[dict]:
    """Evaluate model directories on our tasks with one backend, plus lm-eval task names (the `eval` command).

    Args:
        model_dirs: model directories, evaluated one at a time.
        tasks: a tasks file or ``Task`` list for ``backend``: "mergelab" (``evaluate_models``),
            "lm-eval" (``run_lm_eval``) or "mteb" (``run_mteb``).
        lm_eval_tasks, lm_eval_include: lm-eval task names (and your YAML folder), whatever the backend.
        out: also write the rows as JSON/CSV here.
        tokenizer: a directory whose tokenizer every model uses instead of its own (our backend only).
        threads: torch CPU threads, a number or "auto" (``mergelab.threads``), per model.

    Returns:
        All rows, in ``RESULT_FIELDS`` format.

    Example:
        >>> rows = evaluate_with_backend(["merged/"], "tasks.yml", backend="lm-eval")  # doctest: +SKIP
    """
    if backend not in BACKENDS:
        raise MergelabError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if tasks is None and not lm_eval_tasks:
        raise MergelabError("nothing to evaluate: give a tasks file (--tasks) or lm-eval task names (--lm-eval)")
    if lm_eval_include is not None and not lm_eval_tasks:
        raise MergelabError(f"{lm_eval_include} holds lm-eval tasks, but none is named; name them with --lm-eval")
    if tokenizer is not None and (backend != "mergelab" or lm_eval_tasks):
        raise MergelabError("--tokenizer applies to mergelab's own evaluators only, not to lm-eval or MTEB")
    tasks = load_tasks(tasks) if tasks is not None and not isinstance(tasks, (list, tuple)) else list(tasks or [])
    check_run_settings(batch_size, device)
    check_threads(threads)
    for model_dir in model_dirs:  # fail before the first (slow) load
        check_model_dir(model_dir, tokenizer)
    if out is not None:
        check_results_path(out)
    rows = []
    if tasks and backend == "mergelab":
        rows += evaluate_models(model_dirs, tasks, batch_size=batch_size, device=device, progress=progress,
                                tokenizer=tokenizer, threads=threads)
    for model_dir in model_dirs:
        lm_eval_work = (tasks if backend == "lm-eval" else []) + list(lm_eval_tasks)
        if not (tasks and backend == "mteb") and not lm_eval_work:
            continue
        with use_threads(threads, work_params=model_params(model_dir)):
            if tasks and backend == "mteb":
                rows += run_mteb(model_dir, tasks, batch_size=batch_size, device=device)
            if lm_eval_work:
                rows += run_lm_eval(model_dir, lm_eval_work, include_path=lm_eval_include, batch_size=batch_size,
                                    device=device)
    if out is not None:
        write_rows(rows, out)
    return rows
