"""The grid spec (merging-at-scale's protocol): base, experts with their tasks, methods,
numbers of experts and seeds, evaluation tasks, an optional multitask model.

```yaml
base: models/base
experts:
  - {name: copy, model: models/expert-copy, task: copy}
  - {name: add, model: models/expert-add, task: add}
methods:
  - {name: averaging, merge_method: linear}
  - {name: ties, merge_method: ties, parameters: {density: 0.5}}
  - {name: ties-paper, preset: ties-paper}      # a paper's setting from the registry (`mergelab methods`)
  - {name: dare, preset: dare_ties-paper, parameters: {lambda: 0.8}}   # parameters override the preset's
n_experts: [2, 4]
seeds: [0, 1]
tasks: tasks.yml          # every task needs a category and a split (held_in / held_out)
multitask: models/multitask   # optional reference
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from mergelab.config import read_yaml_mapping
from mergelab.errors import MergelabError
from mergelab.evaluate import Task, load_tasks
from mergelab.data_aware import DATA_AWARE
from mergelab.loading import check_model_dir
from mergelab.methods import get_method, get_preset


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str
    task: str
    train: str | None = None  # its training split (task records): what data-aware methods learn from


class MethodSpec(BaseModel):
    """One method of the grid: a registry method with its parameters, or a named preset (a paper's
    setting, see ``mergelab.methods.PRESETS``) whose parameters ``parameters`` may override."""

    model_config = ConfigDict(extra="forbid")
    name: str
    merge_method: str = ""
    preset: str | None = None
    parameters: dict[str, Any] = {}

    @model_validator(mode="after")
    def _method_or_preset(self) -> MethodSpec:
        if self.preset is None:
            if not self.merge_method:
                raise ValueError(f"method '{self.name}' needs merge_method (or a preset)")
            return self
        try:
            preset = get_preset(self.preset)
        except MergelabError as exc:
            raise ValueError(str(exc)) from None
        if self.merge_method and self.merge_method != preset.method:
            raise ValueError(f"method '{self.name}': preset '{preset.name}' is a setting of {preset.method}, "
                             f"not of {self.merge_method}; drop merge_method or the preset")
        self.merge_method = preset.method
        return self

    def parameters_for(self, n_models: int) -> dict[str, Any]:
        """The top-level merge parameters for ``n_models`` experts: the preset's, then ``parameters``."""
        settings = get_preset(self.preset).settings(n_models) if self.preset else {}
        return {**settings, **self.parameters}


class GridSpec(BaseModel):
    """A validated grid; paths are resolved relative to the spec file."""

    model_config = ConfigDict(extra="forbid")
    base: str
    experts: list[ExpertSpec]
    methods: list[MethodSpec]
    n_experts: list[int]
    seeds: list[int] = [0]
    tasks: str
    multitask: str | None = None
    batch_size: int = 32

    def load_tasks(self) -> list[Task]:
        return load_tasks(self.tasks)


def load_spec(source: str | Path | dict) -> GridSpec:
    """Parse and validate a grid spec before anything is merged."""
    source, where, base_dir = read_yaml_mapping(source, "grid spec", "base, experts, methods, n_experts, tasks")
    try:
        spec = GridSpec.model_validate(source)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise MergelabError(f"{where} is not valid: {problems}") from None
    if base_dir is not None:
        spec = _resolve_paths(spec, base_dir)
    validate_spec(spec, where)
    return spec


def _resolve_paths(spec: GridSpec, base_dir: Path) -> GridSpec:
    def resolve(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute() or not (base_dir / value).exists():
            return value
        return str(base_dir / value)

    return spec.model_copy(update={
        "base": resolve(spec.base), "tasks": resolve(spec.tasks), "multitask": resolve(spec.multitask),
        "experts": [e.model_copy(update={"model": resolve(e.model), "train": resolve(e.train)})
                    for e in spec.experts],
    })


def validate_spec(spec: GridSpec, where: str = "grid spec") -> list[Task]:
    """Every error a grid can have, found before the first merge; returns the tasks."""
    for label, path in [("base", spec.base), ("multitask", spec.multitask)] + [
            (f"expert '{e.name}'", e.model) for e in spec.experts]:
        if path is not None:
            try:  # a directory with config, weights and tokenizer, checked without loading it
                check_model_dir(path, what=f"{label} model")
            except MergelabError as exc:
                raise MergelabError(f"{where}: {exc}") from None
    names = [e.name for e in spec.experts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MergelabError(f"{where}: expert names must be unique; repeated: {', '.join(repeated)}")
    method_names = [m.name for m in spec.methods]
    if not spec.methods or len(set(method_names)) != len(method_names):
        raise MergelabError(f"{where}: give at least one method, each with a unique name")
    reserved = {"base", "expert", "multitask"} & set(method_names)
    if reserved:
        raise MergelabError(f"{where}: method names {sorted(reserved)} are reserved for reference rows; rename them")
    for method in spec.methods:
        definition = DATA_AWARE.get(method.merge_method) or get_method(method.merge_method)
        if method.merge_method in DATA_AWARE:  # it learns from each picked expert's training split
            for expert in spec.experts:
                if expert.train is None or not Path(expert.train).is_file():
                    what = ("has no train split" if expert.train is None
                            else f"has train {expert.train}, which is not a file")
                    raise MergelabError(f"{where}: method '{method.name}' ({method.merge_method}) learns from the "
                                        f"experts' data, but expert '{expert.name}' {what}; add train: PATH (its "
                                        f"task records) to every expert")
        if any(n < definition.min_models or (definition.max_models and n > definition.max_models)
               for n in spec.n_experts):
            raise MergelabError(f"{where}: method '{method.name}' ({method.merge_method}) cannot merge "
                             f"{spec.n_experts} experts")
        for key, value in method.parameters_for(max(spec.n_experts, default=1)).items():
            param = definition.param(key)
            if param is None:
                valid = ", ".join(sorted(p.name for p in definition.params))
                raise MergelabError(f"{where}: method '{method.name}' ({definition.name}) has no parameter '{key}'; "
                                    f"its parameters are: {valid}")
            if not isinstance(value, (dict, list)) and not param.tensor_file and not param.ignored:
                param.check(value, f"of method '{method.name}' in {where}")
        if getattr(definition, "check", None) and method.merge_method in DATA_AWARE:
            try:
                definition.check(method.parameters_for(max(spec.n_experts, default=1)))
            except MergelabError as exc:
                raise MergelabError(f"{where}: method '{method.name}': {exc}") from None
        given = method.parameters_for(1)
        tensor_params = [p for p in definition.params if not (p.ignored or p.tensor_file)]
        missing = [p.name for p in tensor_params if p.required and p.name != "weight" and p.name not in given]
        if missing:  # (the grid gives every expert weight 1 unless the spec says otherwise)
            raise MergelabError(f"{where}: method '{method.name}' ({definition.name}) needs parameter "
                                f"'{missing[0]}'; add it under that method's parameters")
    if not spec.n_experts or any(n < 1 for n in spec.n_experts):
        raise MergelabError(f"{where}: n_experts must list positive numbers")
    if max(spec.n_experts) > len(spec.experts):
        raise MergelabError(f"{where}: n_experts asks for {max(spec.n_experts)} experts but only "
                         f"{len(spec.experts)} are listed")
    if not spec.seeds:
        raise MergelabError(f"{where}: give at least one seed")
    if not Path(spec.tasks).is_file():
        raise MergelabError(f"{where}: tasks file {spec.tasks} does not exist")
    tasks = spec.load_tasks()
    for task in tasks:
        unset = {"category", "split"} - task.model_fields_set
        if unset:
            raise MergelabError(f"{where}: task '{task.name}' has no {' or '.join(sorted(unset))}; the grid needs "
                             f"both to normalize and average (split: held_in or held_out)")
    by_name = {t.name: t for t in tasks}
    for expert in spec.experts:
        task = by_name.get(expert.task)
        if task is None:
            raise MergelabError(f"{where}: expert '{expert.name}' is for task '{expert.task}', which the tasks file "
                             f"does not define")
        if task.split != "held_in":
            raise MergelabError(f"{where}: expert '{expert.name}' is for task '{expert.task}', whose split is "
                             f"'{task.split}'; an expert's own task must be held_in")
    return tasks
