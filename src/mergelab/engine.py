"""The one merge engine: validate everything, then stream tensor by tensor.

``plan_merge`` opens every checkpoint's headers and checks names, shapes, vocab sizes,
integer buffers, parameter ranges and model counts before a single tensor is merged.
``execute`` then reads, for one tensor name at a time, the N+1 input tensors, calls the pure
method, casts once and hands the result to a writer whose layout was fixed up front, inside
a temporary directory that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import difflib
import logging
import math
import shutil
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
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
from mergelab.devices import check_device
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
    params: dict[str, Any] | None  # None: copied from the reference model (integer/bool buffers)


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

    @property
    def reference(self) -> Source:
        return self.base or self.experts[0]

    def close(self) -> None:
        for reader in self.readers + [r for readers in self.tensor_files.values() for r in readers]:
            reader.close()


def run_merge(config: MergeConfig | dict | str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Validate and run a merge; see ``mergelab.merge``."""
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
    base_entry, expert_entries = _assign_roles(cfg, method)
    _check_parameter_names(cfg, method)

    readers: dict[Path, CheckpointReader] = {}
    opened: list[CheckpointReader] = []  # every reader, closed here if planning fails

    def open_source(ref: str, parameters: dict[str, Any]) -> Source:
        path = _locate(ref, cfg)
        if path not in readers:
            readers[path] = CheckpointReader(path, label=ref)
            opened.append(readers[path])
        return Source(ref, readers[path], parameters)

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

    skipped = check_tensors(sources)
    tensor_files = _open_tensor_files(method, experts, cfg, opened)
    compute_dtype, out_dtype = _dtypes(cfg)
    reference = sources[0]
    num_layers = _num_layers(reference.reader)

    jobs = []
    notes: dict[str, None] = {}  # where this merge deliberately differs from mergekit's, in order, once each
    names = sorted(set(reference.reader.tensors) - skipped, key=lambda n: _storage_order(reference.reader, n))
    for name in names:
        info = reference.reader.tensors[name]
        if not info.dtype.is_floating_point:
            jobs.append(TensorJob(name, info.shape, info.dtype, None))
            continue
        params = _tensor_params(method, cfg, experts, name, layer_position(name, num_layers))
        jobs.append(TensorJob(name, info.shape, out_dtype or info.dtype, params))
        if method.notes:
            notes.update(dict.fromkeys(method.notes(params, math.prod(info.shape))))
    for note in notes:
        logging.getLogger("mergelab").warning(f"{method.name} differs from mergekit here: {note}")

    check_free_space(out, output_size(jobs))
    tokenizer_dir = None
    if cfg.tokenizer_source is not None:
        if cfg.tokenizer_source == "union":
            raise MergelabError("tokenizer_source 'union' (merging vocabularies) is not supported; name one model")
        tokenizer_dir = base.reader.path if cfg.tokenizer_source == "base" and base else _locate(cfg.tokenizer_source, cfg)
    return MergePlan(cfg, method, base, experts, tensor_files, jobs, Path(out_dir), reference.reader.path,
                     tokenizer_dir, compute_dtype, options, list(readers.values()))


def _check_options(options: MergeOptions) -> None:
    if options.threads < 1:
        raise MergelabError(f"--threads must be at least 1, got {options.threads}")
    parse_size(options.shard_size)
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
    for entry in cfg.models:
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


def check_tensors(sources: list[Source]) -> set[str]:
    """Check names, shapes, dtypes and integer buffers agree; return the names to leave out
    (legacy ``position_ids`` buffers some of the checkpoints carry and others don't)."""
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
            if other.shape != info.shape:
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
        return (
            f"vocab size mismatch: tensor '{name}' has {shape_a[0]} rows in model '{reference.ref}' "
            f"(config vocab_size {vocab_a}) but {shape_b[0]} in model '{source.ref}' (vocab_size {vocab_b}); "
            f"the models use different vocabularies. Resize the embeddings to one tokenizer "
            f"(model.resize_token_embeddings) before merging"
        )
    return (
        f"tensor '{name}' has shape {tuple(shape_a)} in model '{reference.ref}' but {tuple(shape_b)} in model "
        f"'{source.ref}'; all models must share one architecture"
    )


def _open_tensor_files(method: MergeMethod, experts: list[Source], cfg: MergeConfig,
                       opened: list[CheckpointReader]) -> dict[str, list[CheckpointReader]]:
    """Open, for each tensor-file parameter of the method (a Fisher, say), every expert's file,
    and check it holds each floating-point tensor of that expert with the same shape."""
    files: dict[str, list[CheckpointReader]] = {}
    for param in method.tensor_files:
        readers = files[param.name] = []
        for source in experts:
            path = source.parameters.get(param.name, cfg.parameters.get(param.name))
            if not isinstance(path, str):
                raise MergelabError(f"model '{source.ref}' needs parameters.{param.name}: the {param.help}")
            reader = CheckpointReader(_locate(path, cfg), label=f"{param.name} of {source.ref}")
            opened.append(reader)
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
    device = torch.device(options.device)
    inputs = [reader.path for reader, _ in _inputs(plan)]
    with atomic_directory(plan.out_dir, options.force, inputs=inputs, size=output_size(plan.jobs)) as tmp:
        writer = ShardedWriter(tmp, [(j.name, j.shape, j.out_dtype) for j in plan.jobs],
                               parse_size(options.shard_size))
        progress = tqdm(total=len(plan.jobs), unit="tensor", desc=f"{plan.method.name}", disable=options.quiet)
        try:
            def run(job: TensorJob) -> None:
                writer.write(job.name, _merge_tensor(plan, job, device))
                progress.update(1)

            if options.threads == 1:
                for job in plan.jobs:
                    run(job)
            else:
                with ThreadPoolExecutor(options.threads) as pool:
                    futures = [pool.submit(run, job) for job in plan.jobs]
                    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                    for future in pending:
                        future.cancel()
                    for future in done:
                        future.result()
        finally:
            progress.close()
            writer.close()
        writer.finish()
        float_dtypes = {job.out_dtype for job in plan.jobs if job.params is not None}
        copy_support_files(plan.support_dir, tmp, float_dtypes.pop() if len(float_dtypes) == 1 else None)
        if plan.tokenizer_dir is not None:
            _copy_tokenizer(plan.tokenizer_dir, tmp)
        config_yaml = plan.config.to_yaml()
        (tmp / "mergelab_config.yml").write_text(config_yaml)
        if not options.no_model_card:
            sources = ([plan.base] if plan.base else []) + plan.experts
            write_model_card(tmp, method=plan.method.name, paper=plan.method.paper, summary=plan.method.summary,
                             inputs=[source.ref for source in sources], base=plan.base.ref if plan.base else None,
                             config_yaml=config_yaml)
    return plan.out_dir


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


def _merge_tensor(plan: MergePlan, job: TensorJob, device: torch.device) -> torch.Tensor:
    if job.params is None:
        return plan.reference.reader.get(job.name)
    dtype = plan.compute_dtype

    def load(reader: CheckpointReader) -> torch.Tensor:
        return reader.get(job.name).to(device=device, dtype=dtype)

    base = load(plan.base.reader) if plan.base else None
    tensors = [load(s.reader) for s in plan.experts]
    extra: dict[str, Any] = {}
    if plan.method.uses_seed:
        extra.update(seed=plan.options.seed, key=job.name)
    for param_name, readers in plan.tensor_files.items():  # one tensor per expert, e.g. fisher=
        extra[param_name] = [load(reader) for reader in readers]
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
    for reader, label in _inputs(plan):
        tensor = reader.get(job.name)
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergelabError(f"{label}: tensor '{job.name}' contains {bad} NaN/Inf values; "
                             f"fix or re-export that checkpoint")
    raise MergelabError(f"merging tensor '{job.name}' with {plan.method.name} produced NaN/Inf values from finite "
                     f"inputs (they overflow {str(job.out_dtype).removeprefix('torch.')}?); check the weights and "
                     f"lambda, or choose a wider out_dtype")


def _copy_tokenizer(source: Path, target: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and item.name.startswith(TOKENIZER_FILES):
            shutil.copy2(item, target / item.name)
