"""The merge config: mergekit's YAML format (the common part), validated where it arrives.

Accepted keys: ``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters``,
top-level ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``, ``tokenizer``
(``source``, ``tokens``, ``pad_to_multiple_of``), ``chat_template``, and ``slices`` (instead of
``models``: ``sources`` with ``model``, ``layer_range`` and ``parameters``). A parameter value
may be a scalar, a gradient (a list of numbers interpolated over the layers, first layer to
last; tensors outside the layers take its first value, as in mergekit), or a list of
``{filter: substring, value: ...}`` entries where the first entry whose filter occurs in the
tensor name wins and an entry without a filter (or with ``filter: "*"``) is the fallback.
Per-model parameters given at the top level apply to every model, as in mergekit.

mergekit keys that mergelab does not implement yet (``modules``) and misspelt keys are refused
with one line that names the key; any other problem is reported as one line naming the file
and the field path (``models[1].parameters``).
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergelab.errors import MergelabError

Scalar = Union[bool, int, float, str]


class Filtered(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


ParamValue = Union[Scalar, list[float], list[Filtered]]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = {}


class SliceSource(BaseModel):
    """One model's layers [start, end) in a slice."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = {}


class Slice(BaseModel):
    """Output layers taken from (one source: copied) or merged across (several sources) models."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = {}


class TokenSetting(BaseModel):
    """Where one output token's embedding row comes from (mergekit's ``tokenizer.tokens``)."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = None
    force: bool = False


class TokenizerSetting(BaseModel):
    """mergekit's ``tokenizer:`` block: the output vocabulary and per-token row sources."""

    model_config = ConfigDict(extra="forbid")
    source: str = "base"
    tokens: dict[str, TokenSetting] = {}
    pad_to_multiple_of: int | None = None


class MergeConfig(BaseModel):
    """A merge, as a mergekit-style YAML describes it."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel] = []
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: dict[str, ParamValue] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSetting | None = None
    chat_template: str | None = None
    output: Literal["adapter"] | None = None  # "adapter": merge LoRA adapters into one (mergelab.adapters)
    source_dir: Path | None = None  # where the YAML file lives, to resolve relative model paths

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True, exclude={"source_dir"}),
                              sort_keys=False)


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class MergeOptions:
    """How to run a merge (the config says *what* to merge).

    Each field is one option of ``mergelab.merge(config, out_dir, **options)`` and of
    ``mergelab merge`` (``--shard-size`` for ``shard_size``); its help text below is the CLI's,
    so a new option is one line here.
    """

    force: bool = _option(False, "Replace OUT_DIR if it exists (only after the merge succeeded).")
    threads: int | str = _option("auto", "Tensors merged concurrently, or auto (the usable cores, at most 4; "
                                         "--max-memory bounds what they hold).")
    max_memory: str | int = _option("2.5GB", "Memory the merge process may use: tensors are merged side by side "
                                             "only while each one's ~N+3 float32 copies fit.")
    executor: str = _option("local", "local (threads in this process) or ray (tensor jobs as Ray tasks).")
    address: str | None = _option(None, "Ray cluster address for --executor ray (default: start a local one).")
    device: str = _option("cpu", "Where the arithmetic runs: cpu, cuda, cuda:N or mps.")
    seed: int = _option(0, "Seed of DARE's random masks.")
    shard_size: str | int = _option("5GB", "Largest output shard (5GB, 500MB, or a number of bytes).")
    quiet: bool = _option(False, "No progress bar.")
    no_model_card: bool = _option(False, "Do not write a README.md model card into OUT_DIR.")

    def __post_init__(self) -> None:
        if isinstance(self.threads, str) and self.threads.strip().isdigit():  # from the command line
            self.threads = int(self.threads)
        types = typing.get_type_hints(type(self))
        for spec in fields(self):
            value, expected = getattr(self, spec.name), types[spec.name]
            if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
                raise MergelabError(f"merge option '{spec.name}' must be {_type_name(expected)}, got {value!r}")

    @classmethod
    def from_kwargs(cls, **options: Any) -> MergeOptions:
        """Build the options from keyword arguments, refusing unknown names and wrong types.

        Example:
            >>> MergeOptions.from_kwargs(threads=2).threads
            2
        """
        names = [f.name for f in fields(cls)]
        for name in options:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise MergelabError(f"unknown merge option '{name}'; {hint}options are: {', '.join(names)}")
        return cls(**options)


def _type_name(expected: Any) -> str:
    names = {bool: "true or false", int: "an integer", str: "a string"}
    return " or ".join(names.get(t, t.__name__) for t in typing.get_args(expected) or (expected,))


def load_config(source: MergeConfig | dict | str | Path) -> MergeConfig:
    """Parse a config from a ``MergeConfig``, a dict, a YAML file path, or a YAML string.

    Example:
        >>> load_config("merge_method: linear\\nmodels: [{model: a}, {model: b}]").merge_method
        'linear'
    """
    if isinstance(source, MergeConfig):
        return source
    where = "config"
    source_dir = None
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and ":" not in source):
        path = Path(source)
        if not path.exists():
            raise MergelabError(f"config file {path} does not exist; check the path")
        if not path.is_file():
            raise MergelabError(f"config file {path} is not a regular file; pass the path of a YAML merge config")
        where, source_dir = str(path), path.parent
        try:
            source = path.read_text()
        except UnicodeDecodeError:
            raise MergelabError(f"{path} is not a text file; pass a YAML merge config") from None
        except OSError as exc:
            raise MergelabError(f"cannot read config file {path}: {exc.strerror}") from None
    if isinstance(source, str):
        try:
            source = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise MergelabError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    if source is None:
        raise MergelabError(f"{where} is empty; it needs at least merge_method and models")
    if not isinstance(source, dict):
        raise MergelabError(f"{where} must be a YAML mapping with merge_method and models, not {type(source).__name__}")
    for key, (feature, fix) in UNSUPPORTED_KEYS.items():
        if key in source:
            raise MergelabError(f"{where} uses '{key}' ({feature}), which mergelab does not support yet; {fix}")
    try:
        config = MergeConfig.model_validate({**source, "source_dir": source_dir})
    except ValidationError as exc:
        raise MergelabError(f"{where}: {_validation_problem(exc, source)}") from None
    if config.slices is not None:
        _check_slices(config, where)
    elif not config.models:
        raise MergelabError(f"{where} lists no models; add at least one under 'models'")
    if config.tokenizer is not None and config.tokenizer_source is not None:
        raise MergelabError(f"{where} sets both tokenizer_source and tokenizer.source; keep one "
                            f"(tokenizer: {{source: ...}} is mergekit's newer form)")
    return config


def _check_slices(config: MergeConfig, where: str) -> None:
    if config.models:
        raise MergelabError(f"{where} has both 'models' and 'slices'; use one (slices name their models)")
    if not config.slices:
        raise MergelabError(f"{where} lists no slices; add at least one under 'slices'")
    for number, piece in enumerate(config.slices):
        if not piece.sources:
            raise MergelabError(f"{where}: slices[{number}] has no sources; add at least one")
        lengths = set()
        for index, source in enumerate(piece.sources):
            start, end = source.layer_range
            if not 0 <= start < end:
                raise MergelabError(f"{where}: slices[{number}].sources[{index}].layer_range {[start, end]} must be "
                                    f"[start, end) with 0 <= start < end")
            lengths.add(end - start)
        if len(lengths) > 1:
            raise MergelabError(f"{where}: the sources of slices[{number}] take different numbers of layers "
                                f"({', '.join(str(n) for n in sorted(lengths))}); a merged slice pairs its "
                                f"sources' layers one to one")


# mergekit keys that mergelab does not implement yet: (the feature, what to do instead)
UNSUPPORTED_KEYS = {
    "modules": ("per-module merge configs, for models made of several modules such as a vision tower and a "
                "language model", "merge each module as its own model, or use 'slices' for one decoder"),
}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


_UNION_BRANCHES = {"bool", "int", "float", "str", "Filtered"}


def _walk(loc: tuple, data: Any) -> tuple[list, Any, bool]:
    """Follow a pydantic error location through the input: (the path of real keys and indices,
    the value found there or None, whether a union branch tag such as 'list[float]' was crossed)."""
    path: list = []
    crossed = False
    for part in loc:
        if isinstance(data, dict) and part in data:
            path.append(part)
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            path.append(part)
            data = data[part]
        elif isinstance(part, str) and (part in _UNION_BRANCHES or "[" in part):
            crossed = True  # a branch of a Union that pydantic tried, not a key
        else:
            path.append(part)  # a missing key
            data = None
    return path, data, crossed


def _dotted(path: list) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _shown(value: Any) -> str:
    """A value as the YAML/JSON user wrote it (null, true, "a"), not as Python prints it."""
    return json.dumps(value, default=str)


def _allowed_keys(parent: list) -> list[str]:
    if not parent:
        return [name for name in MergeConfig.model_fields if name != "source_dir"]
    if len(parent) == 2 and parent[0] == "models":
        return list(InputModel.model_fields)
    if parent[0] == "slices" and len(parent) in (2, 4):
        return list((Slice if len(parent) == 2 else SliceSource).model_fields)
    if parent[0] == "tokenizer" and len(parent) in (1, 3):
        return list((TokenizerSetting if len(parent) == 1 else TokenSetting).model_fields)
    return list(Filtered.model_fields)


def _validation_problem(exc: ValidationError, data: dict) -> str:
    """The most specific problem of a validation error, as '<field path>: <what is wrong>'."""
    errors = [(*_walk(tuple(error["loc"]), data), error) for error in exc.errors()]
    # the deepest location is the most specific; there, a misspelt key explains a missing one
    path, value, _, error = max(errors, key=lambda e: (len(e[0]), e[3]["type"] == "extra_forbidden"))
    same_path = [e for e in errors if e[0] == path]
    if error["type"] == "extra_forbidden":
        key, parent = path[-1], path[:-1]
        allowed = _allowed_keys(parent)
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(allowed)}"
        where_key = f"key '{key}' in {_dotted(parent)}" if parent else f"top-level key '{key}'"
        problem = f"unknown {where_key}; {hint}"
    elif error["type"] == "missing":
        problem = f"{_dotted(path)} is required"
    elif error["type"] in ("model_type", "dict_type"):
        problem = f"{_dotted(path)} must be a mapping (key: value), got {_shown(value)}"
    elif len(same_path) > 1 and any(crossed for _, _, crossed, _ in same_path):
        problem = (f"{_dotted(path)} is {_shown(value)}; a parameter value is a number, true/false, a string, "
                   f"a list of numbers (a gradient over the layers) or a list of {{filter, value}} entries")
    else:
        problem = f"{_dotted(path)}: {error['msg'][0].lower()}{error['msg'][1:]}, got {_shown(value)}"
    others = {tuple(p) for p, _, crossed, _ in errors if not crossed and p[:len(path)] != path[:len(p)]}
    return problem + (f" (and {len(others)} more problem{'s' if len(others) > 1 else ''})" if others else "")


def read_records(path: str | Path, what: str = "data file") -> list | dict:
    """The records of a JSONL, JSON (list or object) or YAML file.

    A ``.json`` file that holds one object per line is read as JSONL too. Every error names
    the file and, for a parse error, the line of the file where it is (counted from 1).
    """
    path = Path(path)
    text = _read_text(path, what)
    if not text.strip():
        raise MergelabError(f"{what} {path} is empty; it must hold at least one record")
    if path.suffix in (".yml", ".yaml"):
        try:
            records = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MergelabError(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None
    elif path.suffix != ".jsonl" and not _looks_like_jsonl(text):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MergelabError(f"{what} {path}, line {exc.lineno} column {exc.colno}: not valid JSON "
                                f"({exc.msg})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise MergelabError(f"{what} {path}, line {number} column {exc.colno}: not valid JSON "
                                    f"({exc.msg}); a JSONL file holds one JSON value per line") from None
    if not records:
        raise MergelabError(f"{what} {path} holds no records; it must hold at least one")
    return records


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise MergelabError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise MergelabError(f"{what} {path} is not a file; give the path of a JSON, JSONL or YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MergelabError(f"{what} {path} is not UTF-8 text; give a JSON, JSONL or YAML file") from None
    except OSError as exc:
        raise MergelabError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _looks_like_jsonl(text: str) -> bool:
    """A .json file of two or more lines that each open an object is JSONL (pretty-printed JSON
    has lines that start otherwise), so a bad line is reported as that line, not where a JSON
    parse of the whole text happens to stop."""
    lines = [line.lstrip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 2 and all(line.startswith("{") for line in lines)


def read_yaml_mapping(source: str | Path | dict, what: str, keys_hint: str) -> tuple[dict, str, Path | None]:
    """A YAML file (or an already-parsed dict) as a mapping: (data, where to name it in errors,
    the file's folder for relative paths or None)."""
    if isinstance(source, dict):
        return source, what, None
    path = Path(source)
    text = _read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergelabError(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise MergelabError(f"{what} {path} must be a YAML mapping with {keys_hint}")
    return data, str(path), path.parent


# -- parameter values per tensor -------------------------------------------------------------
_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.7.mlp...`` -> 7), if any."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Where a gradient is evaluated for a tensor, as mergekit 0.1.x does: block i of n at
    i/(n−1) (a single block at 1), and every tensor outside the blocks (embeddings, final
    norm, lm_head) at 0, the gradient's first value."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(value: ParamValue, tensor_name: str, position: float) -> Scalar | None:
    """The value a (possibly filtered or gradient) setting takes for one tensor; None if no
    filter matches it."""
    if isinstance(value, list):
        if value and isinstance(value[0], Filtered):
            for entry in value:
                if entry.filter is None or entry.filter == "*" or entry.filter in tensor_name:
                    return evaluate_setting(entry.value, tensor_name, position)
            return None
        if not value:
            return None
        if len(value) == 1:
            return float(value[0])
        scaled = position * (len(value) - 1)
        low = min(int(scaled), len(value) - 2)
        frac = scaled - low
        return float(value[low]) * (1 - frac) + float(value[low + 1]) * frac
    return value
