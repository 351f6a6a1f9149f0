"""Evaluation tasks: what to score, how, and on which examples; loaded from YAML/JSON/JSONL
and validated before any model is loaded.

A tasks file is YAML (or JSON) with a ``tasks:`` list (or a bare list). Each task::

    name: sentiment                 # unique
    category: classification        # for averaging within categories
    split: held_in                  # held_in / held_out (or any label of yours)
    kind: rank_classification       # rank_classification | generation | loss | retrieval
    metric: accuracy                # default per kind (see METRICS)
    data: sentiment.jsonl           # examples file (relative to the tasks file), or inline:
    examples: [...]
    options: {...}                  # kind-specific: max_new_tokens, length_normalize, pooling, ...

Examples per kind:

- rank_classification: ``{"input": str, "options": [str, ...], "answer": index or option}``
- generation: ``{"input": str, "output": str}`` or ``"outputs": [str, ...]`` (best reference counts)
- loss: ``{"input": str, "output": str}`` (loss of the output given the input) or ``{"text": str}``
- retrieval: ``corpus`` ({id: text} or a JSON/JSONL file of {"id", "text"}), ``queries`` (same),
  ``qrels`` ({query id: {doc id: relevance}} or a file of {"query", "doc", "relevance"})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from mergelab.config import read_records
from mergelab.errors import MergelabError

KINDS = ("rank_classification", "generation", "loss", "retrieval")
METRICS: dict[str, tuple[str, ...]] = {
    "rank_classification": ("accuracy",),
    "generation": ("exact_match", "token_f1", "rouge_l"),
    "loss": ("loss", "perplexity"),
    "retrieval": ("ndcg@k", "mrr@k", "recall@k"),
}
LOWER_IS_BETTER = {"loss", "perplexity"}
# Task options -> the problem with a value, or None. max_length: rank_classification, loss and
# retrieval; max_new_tokens and stop: generation; length_normalize and separator:
# rank_classification; pooling: retrieval. A name not listed is a typo, refused.
OPTIONS: dict[str, Callable[[Any], str | None]] = {
    "max_length": lambda v: None if _is_int(v) and v >= 1 else "must be an integer >= 1",
    "max_new_tokens": lambda v: None if _is_int(v) and v >= 1 else "must be an integer >= 1",
    "stop": lambda v: (None if isinstance(v, list) and all(isinstance(s, str) for s in v)
                       else "must be a list of strings"),
    "length_normalize": lambda v: None if isinstance(v, bool) else "must be true or false",
    "separator": lambda v: None if isinstance(v, str) else "must be a string",
    "pooling": lambda v: None if v in ("cls", "mean") else "must be cls or mean",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
_AT_K = re.compile(r"^(ndcg|mrr|recall)@(\d+)$")


class Task(BaseModel):
    """One evaluation task, validated."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: str
    metric: str = ""
    category: str = "default"
    split: str = "held_out"
    examples: list[dict[str, Any]] = []
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, float]] = {}
    options: dict[str, Any] = {}

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    @property
    def size(self) -> int:
        return len(self.queries) if self.kind == "retrieval" else len(self.examples)


def metric_k(metric: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10)."""
    match = _AT_K.match(metric)
    if not match:
        raise MergelabError(f"retrieval metric '{metric}' must look like ndcg@10, mrr@10 or recall@5")
    return match.group(1), int(match.group(2))


def _as_mapping(value: Any, where: str, key: str = "id", text: str = "text") -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        try:
            return {str(item[key]): str(item[text]) for item in value}
        except (KeyError, TypeError):
            raise MergelabError(f"{where}: each entry needs '{key}' and '{text}'") from None
    raise MergelabError(f"{where} must be a mapping of id -> text or a list of {{{key}, {text}}}")


def _as_qrels(value: Any, where: str) -> dict[str, dict[str, float]]:
    if isinstance(value, dict):
        return {str(q): {str(d): float(r) for d, r in docs.items()} for q, docs in value.items()}
    if isinstance(value, list):
        qrels: dict[str, dict[str, float]] = {}
        for item in value:
            try:
                qrels.setdefault(str(item["query"]), {})[str(item["doc"])] = float(item.get("relevance", 1))
            except (KeyError, TypeError):
                raise MergelabError(f"{where}: each qrel needs 'query' and 'doc' (and optional 'relevance')") from None
        return qrels
    raise MergelabError(f"{where} must map query id -> {{doc id: relevance}} or list {{query, doc, relevance}}")


def _resolve(raw: dict[str, Any], base_dir: Path | None, where: str) -> dict[str, Any]:
    raw = dict(raw)

    def load(value):
        if isinstance(value, str):
            path = Path(value)
            return read_records(path if path.is_absolute() or base_dir is None else base_dir / path)
        return value

    if "data" in raw:
        raw["examples"] = load(raw.pop("data"))
    for key in ("corpus", "queries"):
        if key in raw:
            raw[key] = _as_mapping(load(raw[key]), f"{where}.{key}")
    if "qrels" in raw:
        raw["qrels"] = _as_qrels(load(raw["qrels"]), f"{where}.qrels")
    return raw


def make_task(raw: dict[str, Any], base_dir: Path | None = None, where: str = "task") -> Task:
    """Build and validate one task from a dict (paths relative to ``base_dir``)."""
    if not isinstance(raw, dict):
        raise MergelabError(f"{where} must be a mapping with name, kind and examples")
    where = f"task '{raw.get('name', where)}'"
    try:
        task = Task.model_validate(_resolve(raw, base_dir, where))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or where}: {e['msg']}" for e in exc.errors())
        raise MergelabError(f"{where} is not valid: {problems}") from None
    if task.kind not in KINDS:
        raise MergelabError(f"{where}: unknown kind '{task.kind}'; use one of {', '.join(KINDS)}")
    if not task.metric:
        task.metric = {"retrieval": "ndcg@10"}.get(task.kind, METRICS[task.kind][0])
    allowed = METRICS[task.kind]
    if task.kind == "retrieval":
        name, _ = metric_k(task.metric)
        if f"{name}@k" not in allowed:
            raise MergelabError(f"{where}: unknown metric '{task.metric}'")
    elif task.metric not in allowed:
        raise MergelabError(f"{where}: unknown metric '{task.metric}' for kind {task.kind}; "
                            f"use one of {', '.join(allowed)}")
    _check_options(task, where)
    _check_examples(task, where)
    return task


def _check_options(task: Task, where: str) -> None:
    for name, value in task.options.items():
        if name not in OPTIONS:
            raise MergelabError(f"{where}: unknown option '{name}'; options are {', '.join(OPTIONS)}")
        problem = OPTIONS[name](value)
        if problem:
            raise MergelabError(f"{where}: option {name} {problem}, got {value!r}")


def _check_examples(task: Task, where: str) -> None:
    if task.kind == "retrieval":
        if not task.corpus or not task.queries or not task.qrels:
            raise MergelabError(f"{where}: a retrieval task needs corpus, queries and qrels")
        for query, docs in task.qrels.items():
            if query not in task.queries:
                raise MergelabError(f"{where}: qrels name query '{query}', which is not among the queries")
            for doc in docs:
                if doc not in task.corpus:
                    raise MergelabError(f"{where}: qrel ({query}, {doc}) points to document '{doc}', "
                                     f"which is not in the corpus")
        return
    if not task.examples:
        raise MergelabError(f"{where} has no examples; give 'examples' or a 'data' file")
    for number, example in enumerate(task.examples):
        at = f"{where}, example {number}"
        if not isinstance(example, dict):
            raise MergelabError(f"{at} must be a mapping")
        if task.kind == "rank_classification":
            _check_choice(example, at)
        elif task.kind == "generation":
            if "input" not in example or ("output" not in example and "outputs" not in example):
                raise MergelabError(f"{at} needs 'input' and 'output' (or 'outputs')")
        elif "text" not in example and ("input" not in example or "output" not in example):
            raise MergelabError(f"{at} needs 'text', or 'input' and 'output'")
        _check_texts(example, at)


def _check_texts(example: dict, at: str) -> None:
    """The texts a tokenizer will see must be strings (a number would fail deep inside it)."""
    for key in ("input", "output", "text"):
        if key in example and not isinstance(example[key], str):
            raise MergelabError(f"{at}: '{key}' must be a string, got {example[key]!r}")
    outputs = example.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and outputs and all(isinstance(o, str) for o in outputs)):
        raise MergelabError(f"{at}: 'outputs' must be a non-empty list of strings")


def _check_choice(example: dict, at: str) -> None:
    for key in ("input", "options", "answer"):
        if key not in example:
            raise MergelabError(f"{at} is missing '{key}' (rank classification needs input, options, answer)")
    options = example["options"]
    if not isinstance(options, list) or not options:
        raise MergelabError(f"{at}: options must be a non-empty list")
    answer = example["answer"]
    if isinstance(answer, bool) or not (isinstance(answer, int) and 0 <= answer < len(options)
                                        or isinstance(answer, str) and answer in options):
        raise MergelabError(f"{at}: answer {answer!r} is neither an index into options nor one of them")


def answer_index(example: dict) -> int:
    answer = example["answer"]
    return answer if isinstance(answer, int) else example["options"].index(answer)


def load_tasks(source: str | Path | list | dict) -> list[Task]:
    """Tasks from a YAML/JSON file (``tasks:`` list or bare list), a list of dicts, or one dict.

    Example:
        >>> tasks = load_tasks("tasks.yml")  # doctest: +SKIP
    """
    base_dir = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MergelabError(f"tasks file {path} does not exist")
        base_dir = path.parent
        source = read_records(path, "tasks file")
    if isinstance(source, dict):
        source = source.get("tasks", [source])
    if not isinstance(source, list) or not source:
        raise MergelabError("the tasks file must hold a non-empty list of tasks (under 'tasks:')")
    tasks = [t if isinstance(t, Task) else make_task(t, base_dir, f"task {i}") for i, t in enumerate(source)]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MergelabError(f"task names must be unique; repeated: {', '.join(duplicates)}")
    return tasks
