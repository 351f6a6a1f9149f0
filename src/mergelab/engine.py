"""The one merge engine: validate everything, then stream tensor by tensor.

``plan_merge`` opens every checkpoint's headers and checks names, shapes, vocab sizes,
integer buffers, parameter ranges and model counts before a single tensor is merged.
``execute`` then reads, for one tensor name at a time, the N+1 input tensors, calls the pure
method, casts once and hands the result to a writer whose layout was fixed up front, inside
a temporary directory that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergelab.config import (  # MergeOptions lives with the config so the CLI can read it without torch
    MergeConfig,
    MergeOptions,
    evaluate_setting,
    layer_index,
    layer_position,
    load_config,
)
from mergelab.devices import check_device, torch_threads
from mergelab.errors import MergelabError
from mergelab.io import (
    CheckpointReader,
    ShardedWriter,
    atomic_directory,
    check_output_dir,
    copy_support_files,
    parse_dtype,
    parse_size,
    resolve_model,
)
from mergelab.modelcard import write_model_card
from mergelab.outdir import check_free_space
from mergelab.methods import MergeMethod, get_method
from mergelab.methods import METHODS as _METHODS
from mergelab.layers import cut_config, slice_tensors
from mergelab.vocab import (
    Vocabulary,
    build_vocabulary,
    is_vocab_tensor,
    merge_rows,
    mismatch_message,
    resolve_chat_template,
    save_tokenizer,
    write_chat_template,
)

_COPY = _METHODS["passthrough"]  # a remapped embedding of a one-source slice: its rows, copied
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template",
                   "spiece", "sentencepiece")


@dataclass
class Source:
    """One input model of the merge."""

    ref: str
    reader: CheckpointReader
    parameters: dict[str, Any]


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    params: dict[str, Any] | None  # None: copied (integer/bool buffers; a one-source slice)
    # slices: (index into plan.models, input tensor name) per merged model, or the one copied;
    # None: every expert's tensor of this name
    reads: tuple[tuple[int, str], ...] | None = None
    base_read: str | None = None  # slices: the base model's input tensor (None: job.name, if a base is used)
    remap_rows: bool = False  # embeddings/lm_head: rows aligned to the output vocabulary by token string


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    base: Source | None
    experts: list[Source]
    tensor_files: dict[str, list[CheckpointReader]]  # per tensor-file parameter (e.g. fisher): one per expert
    jobs: list[TensorJob]
    out_dir: Path
    support_dir: Path
    tokenizer_dir: Path | None
    compute_dtype: torch.dtype
    options: MergeOptions
    readers: list[CheckpointReader] = field(default_factory=list)
    vocab: Vocabulary | None = None  # the output vocabulary, when tokenizer_source/tokenizer asks for one
    config_updates: dict[str, Any] = field(default_factory=dict)  # config.json keys the output changes
    chat_template: str | None = None
    card_notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Source:
        return self.base or self.experts[0]

    @property
    def models(self) -> list[Source]:
        """The base (if any) then the experts: what ``TensorJob.reads`` indexes."""
        return ([self.base] if self.base else []) + self.experts

    def close(self) -> None:
        for reader in self.readers + [r for readers in self.tensor_files.values() for r in readers]:
            reader.close()


def run_merge(config: MergeConfig | dict | str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Validate and run a merge; see ``mergelab.merge``."""
    config = load_config(config)
    if config.output == "adapter":  # LoRA adapters into one adapter, not a model
        from mergelab.adapters.combine import merge_adapters_config

        return merge_adapters_config(config, out_dir, MergeOptions.from_kwargs(**options))
    plan = plan_merge(config, out_dir, MergeOptions.from_kwargs(**options))
    try:
        return execute(plan)
    finally:
        plan.close()


# -- planning --------------------------------------------------------------------------------
def plan_merge(config: MergeConfig | dict | str | Path, out_dir: str | Path, options: MergeOptions) -> MergePlan:
    """Check everything that can be checked without merging, and fix the work to do."""
    cfg = load_config(config)
    method = get_method(cfg.merge_method)
    _check_options(options)
    base_entry, expert_entries = _slice_roles(cfg, method) if cfg.slices else _assign_roles(cfg, method)
    _check_parameter_names(cfg, method)

    readers: dict[Path, CheckpointReader] = {}
    opened: list[CheckpointReader] = []  # every reader, closed here if planning fails

    def open_source(ref: str, parameters: dict[str, Any]) -> Source:
        from mergelab.adapters.reader import AdapterReader, adapter_input

        with_adapter = adapter_input(ref, lambda r: _locate(r, cfg))  # BASE+ADAPTER or an adapter directory
        key = with_adapter or _locate(ref, cfg)
        if key not in readers:
            readers[key] = AdapterReader(*with_adapter, label=ref) if with_adapter else CheckpointReader(key, label=ref)
            opened.append(readers[key])
        return Source(ref, readers[key], parameters)

    try:
        return _plan(cfg, method, options, out_dir, base_entry, expert_entries, open_source, readers, opened)
    except BaseException:
        for reader in opened:
            reader.close()
        raise


def _plan(cfg, method, options, out_dir, base_entry, expert_entries, open_source, readers, opened) -> MergePlan:
    base = open_source(base_entry, {}) if base_entry is not None else None
    experts = [open_source(entry.model, entry.parameters) for entry in expert_entries]
    sources = ([base] if base else []) + experts
    out = check_output_dir(out_dir, options.force, inputs=[reader.path for reader in readers.values()])

    vocab = _plan_vocabulary(cfg, sources)
    remapping = vocab is not None and bool(vocab.row_maps)  # False where every model already has the output rows
    remapped = {n for s in sources for n in s.reader.tensors if is_vocab_tensor(n)} if remapping else set()
    skipped = set() if cfg.slices else check_tensors(sources, remapped)
    tensor_files = _open_tensor_files(method, experts, cfg, opened)
    if remapped and tensor_files:  # a row merge would need each file's rows remapped too (not built yet)
        raise MergelabError(f"{method.name} reads per-model {', '.join(tensor_files)} files, which cannot yet be "
                            f"combined with vocabularies that differ (tensors {', '.join(sorted(remapped))}); merge "
                            f"models with the same vocabulary, or use a method without tensor files")
    compute_dtype, out_dtype = _dtypes(cfg)
    reference = sources[0]
    config_updates: dict[str, Any] = {}

    notes: dict[str, None] = {}  # where this merge deliberately differs from mergekit's, in order, once each
    if cfg.slices:
        jobs, reference, config_updates = _slice_jobs(cfg, method, sources, base, out_dtype, remapped, notes)
    else:
        jobs = []
        num_layers = _num_layers(reference.reader)
        names = sorted(set(reference.reader.tensors) - skipped, key=lambda n: _storage_order(reference.reader, n))
        for name in names:
            info = reference.reader.tensors[name]
            if not info.dtype.is_floating_point:
                jobs.append(TensorJob(name, info.shape, info.dtype, None))
                continue
            params = _tensor_params(method, cfg, experts, name, layer_position(name, num_layers))
            jobs.append(TensorJob(name, info.shape, out_dtype or info.dtype, params, remap_rows=name in remapped))
            if method.notes:
                notes.update(dict.fromkeys(method.notes(params, math.prod(info.shape))))
    for note in notes:
        where = "differs from mergekit here" if method.in_mergekit else "note"
        logging.getLogger("mergelab").warning(f"{method.name} {where}: {note}")

    card_notes = _tensor_file_notes(tensor_files, experts)
    if vocab is not None:
        for job in jobs:
            if job.remap_rows:
                job.shape = (vocab.rows, *job.shape[1:])
        config_updates["vocab_size"] = vocab.rows
        if vocab.new_tokens:
            card_notes.append(f"No input model has the token(s) {', '.join(repr(t) for t in vocab.new_tokens)}: "
                              f"their embedding rows start as the mean of the merged rows; train them before use.")
    check_free_space(out, output_size(jobs))
    chat_template = None
    if cfg.chat_template is not None:
        chat_template = resolve_chat_template(cfg.chat_template, {s.ref: s.reader.path for s in sources})
    return MergePlan(cfg, method, base, experts, tensor_files, jobs, Path(out_dir), reference.reader.path,
                     None, compute_dtype, options, list(readers.values()), vocab, config_updates, chat_template,
                     card_notes)


def _plan_vocabulary(cfg: MergeConfig, sources: list[Source]) -> Vocabulary | None:
    """The output vocabulary from tokenizer_source or the tokenizer: block; None without either."""
    setting = cfg.tokenizer
    mode = setting.source if setting is not None else cfg.tokenizer_source
    if mode is None:
        return None
    models = {source.ref: source.reader.path for source in sources}
    row_counts = {source.ref: _embedding_rows(source) for source in sources}
    vocab = build_vocabulary(mode, models, sources[0].ref, row_counts,
                             tokens=setting.tokens if setting is not None else None,
                             pad_to_multiple_of=setting.pad_to_multiple_of if setting is not None else None,
                             locate=lambda ref: _locate(ref, cfg))
    if vocab.is_identity(list(models), row_counts) and not vocab.forced:
        vocab.row_maps = {}  # every model already has the output rows: nothing to remap
    return vocab


def _embedding_rows(source: Source) -> int:
    """Rows of a model's input embedding (its vocabulary tensors' first dimension)."""
    names = [n for n in source.reader.tensors if is_vocab_tensor(n)]
    if not names:
        raise MergelabError(f"model '{source.ref}' has no embedding tensor mergelab recognises, so its vocabulary "
                            f"cannot be aligned; remove tokenizer_source/tokenizer")
    inputs = [n for n in names if "lm_head" not in n and "embed_out" not in n and not n.startswith("output")]
    return source.reader.tensors[(inputs or names)[0]].shape[0]


def _slice_jobs(cfg, method, sources, base, out_dtype, remapped, notes):
    """The jobs of a ``slices`` merge: (jobs, the reference source, config.json updates)."""
    by_ref = {source.ref: index for index, source in enumerate(sources)}
    shapes = {}
    for ref in dict.fromkeys(src.model for piece in cfg.slices for src in piece.sources):
        tensors = sources[by_ref[ref]].reader.tensors
        shapes[ref] = {name: (info.shape, info.dtype.is_floating_point) for name, info in tensors.items()}
    planned, layers, old_count = slice_tensors(cfg.slices, shapes, lambda name: name in remapped)
    reference = sources[by_ref[cfg.slices[0].sources[0].model]]
    jobs = []
    for tensor in planned:
        piece = cfg.slices[tensor.slice_index]
        ref, first_name = tensor.inputs[0]
        info = sources[by_ref[ref]].reader.tensors[first_name]
        remap = tensor.name in remapped
        if len(tensor.inputs) == 1 or not info.dtype.is_floating_point:
            dtype = (out_dtype or info.dtype) if info.dtype.is_floating_point else info.dtype
            jobs.append(TensorJob(tensor.name, info.shape, dtype, None, ((by_ref[ref], first_name),),
                                  remap_rows=remap))
            continue
        slice_cfg = cfg.model_copy(update={"parameters": {**cfg.parameters, **piece.parameters}})
        merged = [(src, name) for src, (_, name) in zip(piece.sources, tensor.inputs)
                  if base is None or src.model != base.ref]
        experts = [Source(src.model, sources[by_ref[src.model]].reader, src.parameters) for src, _ in merged]
        base_read = next((name for src, (_, name) in zip(piece.sources, tensor.inputs)
                          if base is not None and src.model == base.ref), None)
        params = _tensor_params(method, slice_cfg, experts, tensor.name, tensor.position)
        reads = tuple((by_ref[src.model], name) for src, name in merged)
        jobs.append(TensorJob(tensor.name, info.shape, out_dtype or info.dtype, params, reads, base_read, remap))
        if method.notes:
            notes.update(dict.fromkeys(method.notes(params, math.prod(info.shape))))
    configs = {ref: sources[by_ref[ref]].reader.config or {} for ref in shapes}
    original = reference.reader.config or {}
    cut = cut_config(original, layers, configs, old_count)
    return jobs, reference, {key: value for key, value in cut.items() if original.get(key) != value}


def _check_options(options: MergeOptions) -> None:
    if options.threads != "auto" and (not isinstance(options.threads, int) or options.threads < 1):
        raise MergelabError(f"--threads must be a whole number, at least 1, or auto; got {options.threads!r}")
    parse_size(options.shard_size)
    try:
        parse_size(options.max_memory)
    except MergelabError:
        raise MergelabError(f"--max-memory '{options.max_memory}' is not a size; write it like 2.5GB or 800MB") from None
    if options.executor not in ("local", "ray"):
        raise MergelabError(f"--executor '{options.executor}' is not known; use local or ray")
    if options.address is not None and options.executor != "ray":
        raise MergelabError("--address is the Ray cluster's address; it needs --executor ray")
    check_device(options.device, "--device")


def _assign_roles(cfg: MergeConfig, method: MergeMethod):
    """(the base model's ref or None, the expert entries), from the method's registry flags."""
    refs = [entry.model for entry in cfg.models]
    base = cfg.base_model
    first_is_base = False
    if method.uses_base or (method.optional_base and base is not None):
        if base is None and method.first_model_is_base:
            base, first_is_base = refs[0], True
        if base is None:
            raise MergelabError(
                f"{method.name} needs base_model (the model the others were fine-tuned from); add base_model: ..."
            )
        experts = [entry for entry in cfg.models if entry.model != base]
    else:
        if base is not None and base not in refs:
            raise MergelabError(
                f"{method.name} does not use base_model '{base}'; list it under models (with a weight) "
                f"if it should take part, or remove base_model"
            )
        base, experts = None, list(cfg.models)
    _check_model_count(method, len(experts), first_is_base)
    return base, experts


_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _check_model_count(method: MergeMethod, count: int, first_is_base: bool) -> None:
    """``count`` experts (the base not counted) against the method's min_models/max_models."""
    low, high = method.min_models, method.max_models
    if low == high and count != low:
        if method.uses_base:
            others = _NUMBERS[low] if low < len(_NUMBERS) else str(low)
            total = _NUMBERS[low + 1] if low + 1 < len(_NUMBERS) else str(low + 1)
            hint = " (without base_model, the first listed model is the base)" if first_is_base else ""
            raise MergelabError(f"{method.name} merges exactly {total} models (base_model and {others} "
                                f"other{'s' if low > 1 else ''}); got {count + 1}{hint}")
        besides = " (base_model, if given, is not one of them)" if method.optional_base else ""
        raise MergelabError(f"{method.name} merges exactly {low} models{besides}; got {count}")
    if count < low:
        what = "models besides base_model" if method.uses_base else "models"
        raise MergelabError(f"{method.name} needs at least {low} {what}; got {count}")
    if high is not None and count > high:
        raise MergelabError(f"{method.name} takes at most {high} models; got {count}")


def _slice_roles(cfg: MergeConfig, method: MergeMethod):
    """(the base model's ref or None, one entry per other model the slices use), checking each
    merged slice's sources against the method's model count and base_model."""
    from mergelab.config import InputModel

    needs_base = method.uses_base or (method.optional_base and cfg.base_model is not None)
    if method.tensor_files:
        raise MergelabError(f"{method.name} reads per-model tensor files, which slices do not support; merge whole "
                            f"models under 'models'")
    for number, piece in enumerate(cfg.slices):
        refs = [source.model for source in piece.sources]
        if len(refs) == 1:
            continue  # copied
        if len(set(refs)) != len(refs):
            raise MergelabError(f"slices[{number}] lists model '{refs[0]}' twice; a merged slice takes each model once")
        if needs_base and cfg.base_model not in refs:
            raise MergelabError(f"slices[{number}] merges {len(refs)} sources with {method.name}, which needs "
                                f"base_model among them; add base_model and list it as one of the slice's sources")
        count = len(refs) - (1 if needs_base else 0)
        _check_model_count(method, count, False)
    refs = [source.model for piece in cfg.slices for source in piece.sources]
    base = cfg.base_model if needs_base else None
    return base, [InputModel(model=ref) for ref in dict.fromkeys(refs) if ref != base]


def _check_parameter_names(cfg: MergeConfig, method: MergeMethod) -> None:
    valid = {p.name for p in method.params}
    for name in cfg.parameters:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            raise MergelabError(
                f"parameter '{name}' is not used by {method.name}; its parameters are: {', '.join(sorted(valid))}"
                + (f" (did you mean '{close[0]}'?)" if close else "")
            )
    per_model = {p.name for p in method.params if p.per_model}
    for number, piece in enumerate(cfg.slices or []):
        for name in piece.parameters:
            if name not in valid:
                raise MergelabError(f"parameter '{name}' of slices[{number}] is not used by {method.name}; its "
                                    f"parameters are: {', '.join(sorted(valid))}")
    slice_sources = [source for piece in cfg.slices or [] for source in piece.sources]
    for entry in list(cfg.models) + slice_sources:
        for name in entry.parameters:
            if name in valid and name not in per_model:
                raise MergelabError(f"parameter '{name}' of model '{entry.model}' is not per-model; put it under "
                                    f"the top-level parameters")
            if name not in valid:
                close = difflib.get_close_matches(name, per_model, n=1)
                raise MergelabError(
                    f"parameter '{name}' of model '{entry.model}' is not used by {method.name}; its per-model "
                    f"parameters are: {', '.join(sorted(per_model)) or 'none'}"
                    + (f" (did you mean '{close[0]}'?)" if close else "")
                )


def _locate(ref: str, cfg: MergeConfig) -> Path:
    path = Path(ref).expanduser()
    if not path.is_absolute() and not path.exists() and cfg.source_dir is not None:
        beside = cfg.source_dir / path
        if beside.exists():
            return beside
    return resolve_model(ref)


# Buffers that transformers rebuilds at load time and that older versions used to save:
# checkpoints of one model saved by different versions differ only by them.
REBUILT_BUFFERS = ("position_ids",)


def _rebuilt_buffer(reader: CheckpointReader, name: str) -> bool:
    return name.rsplit(".", 1)[-1] in REBUILT_BUFFERS and not reader.tensors[name].dtype.is_floating_point


def check_tensors(sources: list[Source], remapped: set[str] = frozenset()) -> set[str]:
    """Check names, shapes, dtypes and integer buffers agree; return the names to leave out
    (legacy ``position_ids`` buffers some of the checkpoints carry and others don't). The
    ``remapped`` tensors (embeddings aligned by token) may differ in their number of rows."""
    reference = sources[0]
    names = set(reference.reader.tensors)
    skipped: set[str] = set()
    for source in sources[1:]:
        other = set(source.reader.tensors)
        if other == names:
            continue
        for missing_from, present_in, missing in ((source, reference, names - other),
                                                  (reference, source, other - names)):
            skipped |= {n for n in missing if _rebuilt_buffer(present_in.reader, n)}
            missing = missing - skipped
            if missing:
                name = sorted(missing)[0]
                tied = " (one model ties lm_head to the embeddings, the other does not)" if "lm_head" in name else ""
                raise MergelabError(
                    f"tensor '{name}' is in model '{present_in.ref}' but missing from model '{missing_from.ref}'"
                    f"{tied} ({len(missing)} such tensors); all models must share one architecture"
                )
    names -= skipped
    for name in sorted(names):
        info = reference.reader.tensors[name]
        for source in sources[1:]:
            other = source.reader.tensors[name]
            rows_only = name in remapped and len(other.shape) == len(info.shape) and other.shape[1:] == info.shape[1:]
            if other.shape != info.shape and not rows_only:
                raise MergelabError(_shape_message(name, reference, source, info.shape, other.shape))
            if other.dtype.is_floating_point != info.dtype.is_floating_point:
                raise MergelabError(
                    f"tensor '{name}' is {info.dtype} in model '{reference.ref}' but {other.dtype} in model "
                    f"'{source.ref}'; the models must share one architecture"
                )
        if not info.dtype.is_floating_point and len(sources) > 1:
            value = reference.reader.get(name)
            for source in sources[1:]:
                if not torch.equal(value, source.reader.get(name).to(value.dtype)):
                    raise MergelabError(
                        f"integer tensor '{name}' differs between model '{reference.ref}' and model "
                        f"'{source.ref}'; integer buffers are copied, not merged, so they must be identical"
                    )
    return skipped


def _vocab_size(source: Source) -> int | None:
    config = source.reader.config or {}
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def _shape_message(name, reference, source, shape_a, shape_b) -> str:
    vocab_a, vocab_b = _vocab_size(reference), _vocab_size(source)
    rows_differ = len(shape_a) == len(shape_b) and shape_a[0] != shape_b[0] and shape_a[1:] == shape_b[1:]
    if rows_differ and (("embed" in name or "lm_head" in name or "wte" in name)
                        or (vocab_a and vocab_b and vocab_a != vocab_b)):
        return mismatch_message({reference.ref: reference.reader.path, source.ref: source.reader.path},
                                reference.ref, source.ref, name, (shape_a[0], shape_b[0]))
    return (
        f"tensor '{name}' has shape {tuple(shape_a)} in model '{reference.ref}' but {tuple(shape_b)} in model "
        f"'{source.ref}'; all models must share one architecture"
    )


def _open_tensor_files(method: MergeMethod, experts: list[Source], cfg: MergeConfig,
                       opened: list[CheckpointReader]) -> dict[str, list[CheckpointReader]]:
    """Open, for each tensor-file parameter of the method (a Fisher, say), every expert's file,
    and check it against the expert: ``tensor_file_shape`` "same", each floating-point tensor
    with the same shape; "columns", [in, in] for some 2-D tensors [out, in], the same names in
    every expert's file."""
    files: dict[str, list[CheckpointReader]] = {}
    for param in method.tensor_files:
        readers = files[param.name] = []
        for source in experts:
            path = source.parameters.get(param.name, cfg.parameters.get(param.name))
            if not isinstance(path, str):
                raise MergelabError(f"model '{source.ref}' needs parameters.{param.name}: the {param.help}")
            reader = CheckpointReader(_locate(path, cfg), label=f"{param.name} of {source.ref}")
            opened.append(reader)
            if param.tensor_file_shape == "columns":
                _check_column_file(param.name, reader, source, readers[0] if readers else None, experts[0].ref)
                readers.append(reader)
                continue
            for name, info in source.reader.tensors.items():
                if not info.dtype.is_floating_point:
                    continue
                found = reader.tensors.get(name)
                if found is None:
                    raise MergelabError(f"{param.name} file {reader.path} has no tensor '{name}' for model "
                                        f"'{source.ref}'; re-estimate it for this model")
                if found.shape != info.shape:
                    raise MergelabError(f"{param.name} file {reader.path}: tensor '{name}' has shape {found.shape}, "
                                        f"model '{source.ref}' has {info.shape}")
            readers.append(reader)
    return files


def _tensor_file_notes(tensor_files: dict[str, list[CheckpointReader]], experts: list[Source]) -> list[str]:
    """One model-card line per tensor file the merge used (a Fisher, RegMean's Grams): its path,
    how many tensors it holds, and what its writer recorded (``mergelab regmean-stats``: examples)."""
    from safetensors import safe_open

    notes = []
    for param_name, readers in tensor_files.items():
        for source, reader in zip(experts, readers):
            recorded = {}
            if reader.path.is_file() and reader.path.suffix == ".safetensors":
                with safe_open(reader.path, "pt") as handle:
                    recorded = {k: v for k, v in (handle.metadata() or {}).items() if k != "format"}
            extra = "".join(f", {key} {value}" for key, value in sorted(recorded.items()))
            notes.append(f"{param_name} of `{source.ref}`: `{reader.path}` ({len(reader.tensors)} tensors{extra})")
    return notes


def _check_column_file(param: str, reader: CheckpointReader, source: Source, first: CheckpointReader | None,
                       first_ref: str) -> None:
    """A per-tensor [in, in] file (RegMean's Grams): each entry names a 2-D floating-point tensor
    [out, in] of the model and has shape [in, in]; every expert's file covers the same tensors."""
    if not reader.tensors:
        raise MergelabError(f"{param} file {reader.path} holds no tensors; recompute it for model '{source.ref}'")
    for name, found in reader.tensors.items():
        info = source.reader.tensors.get(name)
        if info is None or len(info.shape) != 2 or not info.dtype.is_floating_point:
            what = "has no such tensor" if info is None else f"has it with shape {tuple(info.shape)}, not a 2-D weight"
            raise MergelabError(f"{param} file {reader.path}: tensor '{name}' does not belong to a 2-D weight of model "
                                f"'{source.ref}' (the model {what}); recompute it for this model")
        columns = info.shape[1]
        if tuple(found.shape) != (columns, columns):
            raise MergelabError(f"{param} file {reader.path}: tensor '{name}' has shape {tuple(found.shape)}, but "
                                f"model '{source.ref}' has that weight as {tuple(info.shape)}, so it must be "
                                f"({columns}, {columns}); recompute it for this model")
    if first is not None and set(first.tensors) != set(reader.tensors):
        only = sorted(set(first.tensors) ^ set(reader.tensors))[0]
        holder, other = (first, reader) if only in first.tensors else (reader, first)
        raise MergelabError(f"{param} file {holder.path} has tensor '{only}' but {other.path} does not; compute "
                            f"every model's {param} file the same way (model '{first_ref}' and '{source.ref}')")


def _dtypes(cfg: MergeConfig) -> tuple[torch.dtype, torch.dtype | None]:
    dtype = parse_dtype(cfg.dtype, "dtype")
    out_dtype = parse_dtype(cfg.out_dtype, "out_dtype") or dtype
    compute = torch.float64 if torch.float64 in (dtype, out_dtype) else torch.float32
    return compute, out_dtype


def _num_layers(reader: CheckpointReader) -> int:
    config = reader.config or {}
    count = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if count:
        return int(count)
    indices = [layer_index(name) for name in reader.tensors]
    return max((i for i in indices if i is not None), default=0) + 1


def _storage_order(reader: CheckpointReader, name: str):
    info = reader.tensors[name]
    return (str(info.file), info.offsets[0] if info.offsets else 0, name)


def _tensor_params(method: MergeMethod, cfg: MergeConfig, experts: list[Source], name: str,
                   position: float) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for param in method.tensor_params:
        if param.per_model:
            values = []
            for source in experts:
                setting = source.parameters.get(param.name)
                value = evaluate_setting(setting, name, position) if setting is not None else None
                if value is None and param.name in cfg.parameters:
                    value = evaluate_setting(cfg.parameters[param.name], name, position)
                if value is None and param.required:
                    raise MergelabError(
                        f"{method.name} needs parameter '{param.name}' for model '{source.ref}' (tensor '{name}'), "
                        f"as mergekit does; set it under that model's parameters or the top-level parameters")
                value = param.default if value is None else value
                values.append(param.check(value, f"of model '{source.ref}' for tensor '{name}'"))
            params[param.name] = values
        else:
            setting = cfg.parameters.get(param.name)
            value = evaluate_setting(setting, name, position) if setting is not None else None
            if value is None and param.required:
                raise MergelabError(f"{method.name} needs parameter '{param.name}' (tensor '{name}'), as mergekit "
                                    f"does; set it under the top-level parameters")
            params[param.name] = param.check(param.default if value is None else value, f"for tensor '{name}'")
    problem = method.check(params, f"for tensor '{name}'") if method.check else None
    if problem:
        raise MergelabError(problem)
    return params


# -- execution -------------------------------------------------------------------------------
def execute(plan: MergePlan) -> Path:
    """Run a validated plan; returns the output directory."""
    options = plan.options
    inputs = [reader.path for reader, _ in _inputs(plan)]
    with atomic_directory(plan.out_dir, options.force, inputs=inputs, size=output_size(plan.jobs)) as tmp:
        writer = ShardedWriter(tmp, [(j.name, j.shape, j.out_dtype) for j in plan.jobs],
                               parse_size(options.shard_size))
        progress = tqdm(total=len(plan.jobs), unit="tensor", desc=f"{plan.method.name}", disable=options.quiet)
        try:
            if options.executor == "ray":
                from mergelab.distributed import run_jobs_on_ray

                writer.record(run_jobs_on_ray(plan, tmp, progress))
            else:
                run_jobs(plan, plan.jobs, writer, progress)
        finally:
            progress.close()
            writer.close()
        writer.finish()
        float_dtypes = {job.out_dtype for job in plan.jobs if job.params is not None}
        copy_support_files(plan.support_dir, tmp, float_dtypes.pop() if len(float_dtypes) == 1 else None)
        _write_vocabulary_and_layers(plan, tmp)
        config_yaml = plan.config.to_yaml()
        (tmp / "mergelab_config.yml").write_text(config_yaml)
        if not options.no_model_card:
            sources = ([plan.base] if plan.base else []) + plan.experts
            write_model_card(tmp, method=plan.method.name, paper=plan.method.paper, summary=plan.method.summary,
                             inputs=[source.ref for source in sources], base=plan.base.ref if plan.base else None,
                             config_yaml=config_yaml)
            if plan.card_notes:
                with (tmp / "README.md").open("a") as card:
                    card.write("\n## Notes\n\n" + "".join(f"- {note}\n" for note in plan.card_notes))
    return plan.out_dir


AUTO_MAX_THREADS = 4  # more tensors at once than this only trade memory for little speed
METHOD_TEMPORARIES = 2  # compute-dtype tensors a method allocates beside its inputs (TIES: γ and |τ|)


def merge_threads(options: MergeOptions) -> int:
    """The worker threads of a local merge: ``--threads``, or for auto the usable cores (≤ 4)."""
    if options.threads != "auto":
        return options.threads
    from mergelab.threads import pinned_threads

    pinned = pinned_threads()
    if pinned is not None:  # inside use_threads(n) (a study's worker process pins 1): follow it
        return pinned
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, AUTO_MAX_THREADS))


def job_bytes(plan: MergePlan, job: TensorJob) -> int:
    """Memory one tensor job holds while it runs (README, "Memory"): its inputs and the method's
    temporaries in the compute dtype, the raw bytes of one read, and the output."""
    numel = math.prod(job.shape)
    if job.params is None and not job.remap_rows:
        return numel * job.out_dtype.itemsize * 2
    inputs = len(plan.experts) + (1 if plan.base else 0)
    # tensor-file entries have their own shapes ([in, in] Grams); a method may solve with them in float64
    files = sum(math.prod(reader.tensors[job.name].shape) for readers in plan.tensor_files.values()
                for reader in readers if job.name in reader.tensors)
    return (numel * (plan.compute_dtype.itemsize * (inputs + METHOD_TEMPORARIES) + 4 + job.out_dtype.itemsize)
            + files * (plan.compute_dtype.itemsize + 8))


def run_jobs(plan: MergePlan, jobs: list[TensorJob], writer: ShardedWriter, progress=None,
             threads: int | None = None) -> list[str]:
    """Merge ``jobs`` and write each at its offset: on ``threads`` worker threads (default: the
    plan's), each reusing its own buffers, with the tensors in flight bounded by --max-memory.
    Returns the names written. The first failure stops the rest and is raised."""
    options = plan.options
    device = torch.device(options.device)
    threads = min(threads or merge_threads(options), max(1, len(jobs)))
    if device.type == "cpu":
        _return_freed_memory()
    elif threads > 1:
        _load_linalg(device)
    budget = MemoryBudget(parse_size(options.max_memory) - _resident_bytes(), threads)
    local = threading.local()
    written: list[str] = []

    def run(job: TensorJob) -> None:
        workspace = getattr(local, "workspace", None) or Workspace()
        local.workspace = workspace
        with budget.hold(workspace, job_bytes(plan, job)):
            writer.write(job.name, _merge_tensor(plan, job, device, workspace))
        written.append(job.name)
        if progress is not None:
            progress.update(1)

    if threads == 1:
        for job in jobs:
            run(job)
        return written
    # Each worker thread gets an equal share of torch's intra-op threads, so that workers and
    # their OpenMP teams together never oversubscribe the cores.
    pool = ThreadPoolExecutor(threads)
    try:
        with torch_threads(max(1, torch.get_num_threads() // threads)):
            futures = [pool.submit(run, job) for job in jobs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
    finally:  # on a failure, Ctrl-C or SIGTERM: drop the queued jobs, let the running ones end
        pool.shutdown(wait=True, cancel_futures=True)
    return written


def _load_linalg(device: torch.device) -> None:
    """Load torch's linear-algebra libraries for ``device`` in this thread. They load lazily on
    the first call, and on CUDA two worker threads making that call at once fail ("lazy wrapper
    should be called at most once": RegMean's solve, seen on an H200 with torch 2.11)."""
    if device.type == "cuda":
        eye = torch.eye(2, device=device)
        torch.linalg.solve_ex(eye, eye)
        torch.linalg.svd(eye)
        torch.linalg.eigh(eye)


_MMAP_THRESHOLD = 4 << 20


def _return_freed_memory() -> None:
    """Have glibc serve every allocation of 4 MiB or more with its own mmap, so that a freed
    buffer goes back to the system at once. glibc's default threshold adapts up to 32 MiB, and
    tensors below it are freed into per-thread heaps that keep them: with two workers that was
    ~0.3 GB of resident memory no tensor used (748M benchmark). A no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _resident_bytes() -> int:
    """This process' resident memory now (0 where /proc is missing): the budget is for the whole
    process, so what it already holds (torch, the plan) is not available to tensors."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Workspace:
    """One worker's buffers, reused from tensor to tensor: the raw bytes of a read and one
    compute-dtype slot per input. A fresh multi-hundred-MB tensor per read costs a page fault
    per 4 KB page (most of a merge's time, benchmarks/README.md); a reused one costs nothing."""

    def __init__(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.slots: list[torch.Tensor] = []
        self.held = 0  # bytes of the memory budget this worker holds

    def load(self, reader, name: str, slot: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``reader``'s tensor ``name`` as ``dtype`` on ``device``, in slot ``slot`` (CPU)."""
        # readers that fill a caller's buffer (CheckpointReader, AdapterReader) reuse the slots; others read fresh
        if device.type != "cpu" or not getattr(reader, "reads_into_buffers", type(reader) is CheckpointReader):
            return reader.get(name).to(device=device, dtype=dtype)
        info = reader.tensors[name]
        numel = math.prod(info.shape)
        while len(self.slots) <= slot:
            self.slots.append(torch.empty(0, dtype=torch.uint8))
        if self.slots[slot].numel() < numel * dtype.itemsize:
            self.slots[slot] = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
        target = self.slots[slot][:numel * dtype.itemsize].view(dtype).view(info.shape)
        if info.dtype == dtype:  # read straight into the slot
            return reader.get(name, out=self.slots[slot])
        if self.raw.numel() < numel * info.dtype.itemsize:
            self.raw = torch.empty(numel * info.dtype.itemsize, dtype=torch.uint8)
        return target.copy_(reader.get(name, out=self.raw))

    def release(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.slots = []


class MemoryBudget:
    """Bytes the tensors in flight may use together, shared by the worker threads.

    A worker holds what its largest job since it last let go needed. A job that needs more
    waits until that much is free, letting go of its own buffers first; a job larger than the
    whole budget runs once nothing else is held (it cannot run in less). When a worker is
    waiting, the others let go after their current job, so a large tensor is not starved by
    a stream of small ones.
    """

    def __init__(self, total: int, threads: int):
        self.total = max(total, 0)
        self.threads = threads
        self.used = 0
        self.waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, workspace: Workspace, need: int):
        with self._cond:
            if need > workspace.held:
                self._let_go(workspace)
                while self.used and self.used + need > self.total:
                    self.waiting += 1
                    self._cond.wait()
                    self.waiting -= 1
                self.used += need
                workspace.held = need
        try:
            yield
        finally:
            with self._cond:
                if self.waiting or workspace.held * self.threads > self.total:  # a large job: give it back
                    self._let_go(workspace)

    def _let_go(self, workspace: Workspace) -> None:
        workspace.release()
        self.used -= workspace.held
        workspace.held = 0
        self._cond.notify_all()


def output_size(jobs: list[TensorJob]) -> int:
    """Bytes of weights the merge writes (support files are small beside them)."""
    total = 0
    for job in jobs:
        numel = 1
        for dim in job.shape:
            numel *= dim
        total += numel * job.out_dtype.itemsize
    return total


def _inputs(plan: MergePlan) -> list[tuple[CheckpointReader, str]]:
    """Every (reader, label) a merged tensor is computed from."""
    sources = ([plan.base] if plan.base else []) + plan.experts
    files = [reader for readers in plan.tensor_files.values() for reader in readers]
    return [(s.reader, f"model '{s.ref}'") for s in sources] + [(r, r.label) for r in files]


def _job_inputs(plan: MergePlan, job: TensorJob) -> tuple[tuple[Source, str] | None, list[tuple[Source, str]]]:
    """Which tensor of which model a job reads: (the base's or None, the experts')."""
    if job.reads is None:
        uses_base = plan.base is not None and job.params is not None
        return ((plan.base, job.name) if uses_base else None), [(s, job.name) for s in plan.experts]
    models = plan.models
    base = (plan.base, job.base_read) if plan.base is not None and job.base_read is not None else None
    return base, [(models[index], name) for index, name in job.reads]


def _merge_tensor(plan: MergePlan, job: TensorJob, device: torch.device,
                  workspace: Workspace | None = None) -> torch.Tensor:
    """One job's output tensor (CPU, its output dtype). With a ``workspace``, inputs are read
    into its buffers and the result may be a view of them: write it before the next job."""
    if job.params is None and not job.remap_rows:  # copied: integer buffers, one-source slices
        source, name = (plan.reference, job.name) if job.reads is None else (plan.models[job.reads[0][0]],
                                                                             job.reads[0][1])
        return source.reader.get(name).to(job.out_dtype)
    if job.remap_rows:
        with plan.vocab.lock:  # embeddings are remapped one at a time: at most one (V, H) output extra
            return _merge_tensor_rows(plan, job, device)
    return _merge_tensor_rows(plan, job, device, workspace)


def _merge_tensor_rows(plan: MergePlan, job: TensorJob, device: torch.device,
                       workspace: Workspace | None = None) -> torch.Tensor:
    dtype = plan.compute_dtype
    slots = iter(range(1 << 30))

    def load(reader: CheckpointReader, name: str = job.name) -> torch.Tensor:
        if workspace is None or job.remap_rows:
            return reader.get(name).to(device=device, dtype=dtype)
        return workspace.load(reader, name, next(slots), dtype, device)

    base_input, expert_inputs = _job_inputs(plan, job)
    base = load(base_input[0].reader, base_input[1]) if base_input else None
    tensors = [load(s.reader, name) for s, name in expert_inputs]
    extra: dict[str, Any] = {}
    if plan.method.uses_seed and job.params is not None:
        extra.update(seed=plan.options.seed, key=job.name)
    for param_name, readers in plan.tensor_files.items():  # one tensor per expert, e.g. fisher=
        # a "columns" file (RegMean's Grams) has entries for some tensors only: None for the others
        extra[param_name] = [load(reader) if job.name in reader.tensors else None for reader in readers]
    if job.remap_rows:
        method, params = (plan.method, job.params) if job.params is not None else (_COPY, {"scale": [1.0]})
        merged = merge_rows(plan.vocab, method, params, extra, (base_input[0].ref, base) if base_input else None,
                            [(s.ref, t) for (s, _), t in zip(expert_inputs, tensors)])
    else:
        merged = plan.method(tensors, base, **job.params, **extra)
    out = merged.to(dtype=job.out_dtype)
    # NaN and Inf in any input propagate into the result (even through a zero weight or mask:
    # 0·NaN = NaN), so one reduction of the output guards every input at once. A sum that
    # overflows is confirmed entry by entry before anything is blamed; a bad result pays for
    # finding the culprit. (sum(dtype=float64) would copy the tensor to float64 first.)
    suspicious = not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all())
    if suspicious or (job.out_dtype == torch.float16 and not bool(torch.isfinite(out).all())):
        _explain_non_finite(plan, job)
    return out.cpu()


def _explain_non_finite(plan: MergePlan, job: TensorJob) -> None:
    base_input, expert_inputs = _job_inputs(plan, job)
    files = [(reader, job.name, reader.label) for readers in plan.tensor_files.values() for reader in readers
             if job.name in reader.tensors]
    for reader, name, label in [(s.reader, n, f"model '{s.ref}'") for s, n in ([base_input] if base_input else [])
                                + expert_inputs] + files:
        tensor = reader.get(name)
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergelabError(f"{label}: tensor '{name}' contains {bad} NaN/Inf values; "
                             f"fix or re-export that checkpoint")
    raise MergelabError(f"merging tensor '{job.name}' with {plan.method.name} produced NaN/Inf values from finite "
                     f"inputs (they overflow {str(job.out_dtype).removeprefix('torch.')}?); check the weights and "
                     f"lambda, or choose a wider out_dtype")


def _copy_tokenizer(source: Path, target: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and item.name.startswith(TOKENIZER_FILES):
            shutil.copy2(item, target / item.name)


def _write_vocabulary_and_layers(plan: MergePlan, target: Path) -> None:
    """After the support files are copied: the output tokenizer, config.json's changed keys
    (vocab_size, the layer count and per-layer lists of a slices merge) and the chat template."""
    if plan.tokenizer_dir is not None:
        _copy_tokenizer(plan.tokenizer_dir, target)
    if plan.vocab is not None:
        save_tokenizer(plan.vocab, target)
    config_path = target / "config.json"
    if plan.config_updates and config_path.is_file():
        config = json.loads(config_path.read_text())
        nested = config.get("text_config") if "vocab_size" not in config and isinstance(config.get("text_config"),
                                                                                           dict) else None
        for key, value in plan.config_updates.items():
            (nested if key == "vocab_size" and nested is not None else config)[key] = value
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if plan.chat_template is not None:
        write_chat_template(target, plan.chat_template)
