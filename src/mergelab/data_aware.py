"""Data-aware merge methods: what each needs from the experts' own data before it can merge.

RegMean needs each expert's input Gram matrices (``mergelab regmean-stats``) before the
engine's streaming merge; AdaMerging learns its coefficients on the experts' unlabeled inputs
and writes the merged model itself. ``DATA_AWARE`` maps a grid method's ``merge_method`` to
that work, so the grid runner and its spec validator consult one table, never method names:
an expert of a grid that uses one of these methods carries its training split (``train:``),
and statistics are cached beside the run (``OUT/stats/<expert>-<hash>.safetensors``) and
reused by every cell that picks the expert.

The records are the evaluation harness's task format, one per line or in a JSON/YAML list:
``{"input", "output"}`` (generation), ``{"input", "options", "answer"}`` (rank
classification: the answer is the option the model was trained to give), ``{"text"}`` or a
bare string (an input without an output).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mergelab.config import read_records
from mergelab.errors import MergelabError
from mergelab.methods.base import Param


def task_records(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """The first ``limit`` records of a task file as ``{"input": ..., "output": ...}`` (``output``
    absent where the record has none): what a decoder is fine-tuned on; a rank-classification
    record keeps its ``options`` too.

    Example:
        >>> task_records("data/add/train.jsonl", 2)  # doctest: +SKIP
        [{'input': 'add 3 4 =', 'output': '7'}, {'input': 'add 1 1 =', 'output': '2'}]
    """
    path = Path(path)
    rows = read_records(path, "data file")
    if not isinstance(rows, list):
        raise MergelabError(f"data file {path} must hold a list of records (JSONL, or a JSON/YAML list)")
    records = []
    for number, row in enumerate(rows[:limit] if limit is not None else rows, 1):
        records.append(_record(row, f"data file {path}, record {number}"))
    if not records:
        raise MergelabError(f"data file {path} holds no records")
    return records


def _record(row: Any, where: str) -> dict[str, str]:
    if isinstance(row, str):
        return {"input": row}
    if not isinstance(row, dict):
        raise MergelabError(f"{where} is {type(row).__name__}; give a string or an object with 'input' or 'text'")
    text = row.get("input", row.get("text"))
    if not isinstance(text, str):
        raise MergelabError(f"{where} has no 'input' (or 'text') string; the task format is "
                            f"{{\"input\", \"output\"}} or {{\"input\", \"options\", \"answer\"}}")
    if "options" in row:
        options, answer = row["options"], row.get("answer")
        if isinstance(answer, str) and isinstance(options, list) and answer in options:
            answer = options.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not isinstance(options, list) \
                or not 0 <= answer < len(options) or not isinstance(options[answer], str):
            raise MergelabError(f"{where}: 'answer' must index 'options' (or be one of them), got {answer!r}")
        if not all(isinstance(option, str) for option in options):
            raise MergelabError(f"{where}: 'options' must be strings")
        return {"input": text, "output": options[answer], "options": options}
    output = row.get("output")
    if output is not None and not isinstance(output, str):
        raise MergelabError(f"{where}: 'output' must be a string, got {output!r}")
    return {"input": text} if output is None else {"input": text, "output": output}


# -- the registry the grid consults -----------------------------------------------------------
@dataclass(frozen=True)
class GridExpert:
    """One picked expert of a grid cell: its name, model directory and training split."""

    name: str
    model: str
    train: str


@dataclass(frozen=True)
class DataAwareMethod:
    """What a grid needs to run a data-aware method: the parameters a grid method may set, the
    number of experts it merges, and ``merge(base, experts, parameters, out, stats_dir, seed)``,
    which writes the merged model directory ``out`` (computing or reusing statistics in
    ``stats_dir``)."""

    name: str
    params: tuple[Param, ...]
    merge: Callable[..., Path]
    paper: str
    min_models: int = 1
    max_models: int | None = None
    check: Callable[[dict[str, Any]], None] | None = None  # raises MergelabError for bad parameters

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def cached_gram(expert: GridExpert, stats_dir: str | Path, examples: int, max_length: int) -> Path:
    """The expert's Gram file in ``stats_dir``, computed on its train split unless an identical
    request (same model files, data file and settings) made it already."""
    from mergelab.grams import regmean_stats

    key = _fingerprint([expert.model, expert.train], {"examples": examples, "max_length": max_length})
    path = Path(stats_dir) / f"{expert.name}-{key}.safetensors"
    if not path.is_file():
        # force: two grid workers may compute the same file; both write the same values
        regmean_stats(expert.model, expert.train, path, examples=examples, max_length=max_length, force=True,
                      quiet=True)
    return path


def _fingerprint(paths: list[str], settings: dict[str, Any]) -> str:
    """A short hash of the files behind ``paths`` (name, size and modification time of each) and
    ``settings``: a rebuilt model or edited data file gets new statistics."""
    stamps = []
    for path in map(Path, paths):
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        stamps.append([str(path.resolve())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    payload = json.dumps({"files": stamps, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _merge_regmean(base: str, experts: list[GridExpert], parameters: dict[str, Any], out: Path,
                   stats_dir: Path, seed: int) -> Path:
    from mergelab import merge

    settings = dict(parameters)
    examples = int(settings.pop("examples", 256))
    max_length = int(settings.pop("max_length", 512))
    models = [{"model": e.model, "parameters": {"gram": str(cached_gram(e, stats_dir, examples, max_length))}}
              for e in experts]
    config = {"merge_method": "regmean", "models": models, "parameters": settings}
    return merge(config, out, force=True, quiet=True, seed=seed)


def _merge_adamerging(base: str, experts: list[GridExpert], parameters: dict[str, Any], out: Path,
                      stats_dir: Path, seed: int) -> Path:
    from mergelab.adamerging import adamerging

    settings = {k: (int(v) if k in _INTEGER_SETTINGS else v) for k, v in parameters.items()}
    adamerging(base, [(e.model, e.train) for e in experts], out, force=True, quiet=True, seed=seed,
               **settings)
    return out


_INTEGER_SETTINGS = ("steps", "examples", "batch_size", "max_length", "max_params")
_STATS_PARAMS = (
    Param("examples", 256, kind=int, low=1, help="training examples each expert's statistics are computed on"),
    Param("max_length", 512, kind=int, low=2, help="tokens kept of each example"),
)


def _regmean_params() -> tuple[Param, ...]:
    from mergelab.methods import METHODS

    return tuple(p for p in METHODS["regmean"].params if not p.tensor_file) + _STATS_PARAMS


def _check_adamerging(parameters: dict[str, Any]) -> None:
    from mergelab.adamerging import check_settings

    check_settings(**{k: (int(v) if k in _INTEGER_SETTINGS else v) for k, v in parameters.items()})


def _adamerging_params() -> tuple[Param, ...]:
    from mergelab.adamerging import DEFAULTS

    return (
        Param("mode", DEFAULTS["mode"], kind=str, help="task: one λ per expert; layer: one per expert and block"),
        Param("positions", DEFAULTS["positions"], kind=str,
              help="last: the prediction after each input (over its options); all: every token"),
        Param("steps", DEFAULTS["steps"], kind=int, low=1, help="Adam steps on the entropy"),
        Param("lr", DEFAULTS["lr"], low=0.0, low_open=True, help="Adam's learning rate"),
        Param("init", DEFAULTS["init"], help="every λ's starting value (the paper's 0.3)"),
        Param("examples", DEFAULTS["examples"], kind=int, low=1, help="unlabeled inputs per expert"),
        Param("batch_size", DEFAULTS["batch_size"], kind=int, low=1, help="inputs per expert per step"),
        Param("max_length", DEFAULTS["max_length"], kind=int, low=2, help="tokens kept of each input"),
        Param("max_params", DEFAULTS["max_params"], kind=int, low=1,
              help="refuse models with more parameters (the task vectors are held in memory)"),
    )


DATA_AWARE: dict[str, DataAwareMethod] = {
    "regmean": DataAwareMethod(
        "regmean", _regmean_params(), _merge_regmean,
        "Jin et al. 2023, RegMean (ICLR 2023): Grams of each expert's train split, then `merge_method: regmean`",
    ),
    "adamerging": DataAwareMethod(
        "adamerging", _adamerging_params(), _merge_adamerging,
        "Yang et al. 2024, AdaMerging (ICLR 2024): λ learned on each expert's unlabeled train inputs",
        check=_check_adamerging,
    ),
}
