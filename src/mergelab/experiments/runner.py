"""The grid runner: method × number of experts × seed, merged with the engine, evaluated with
the harness, normalized against experts and base, written row by row (resumable).

Results contract (``OUT/results.csv``)::

    method,n_experts,seed,experts,task,category,split,score,reference_score,normalized

``experts`` is the ;-joined picked names. Reference rows: ``base`` (every task), ``expert``
(its own task, held_in) and ``multitask`` (every task) have empty n_experts and seed.
"""

from __future__ import annotations

import csv
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mergelab.data_aware import DATA_AWARE, GridExpert
from mergelab.errors import MergelabError
from mergelab.evaluate import evaluate_models, load_tasks, normalized_performance, write_rows
from mergelab.experiments.spec import GridSpec, load_spec, validate_spec
from mergelab.loading import first_line
from mergelab.outdir import check_output_dir
from mergelab.methods import get_method
from mergelab.parallel import WorkerPool, check_workers, worker_pool

RESULT_COLUMNS = ("method", "n_experts", "seed", "experts", "task", "category", "split", "score",
                  "reference_score", "normalized")


@dataclass(frozen=True)
class Cell:
    method: str
    n_experts: int
    seed: int
    experts: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.method, str(self.n_experts), str(self.seed)


def pick_experts(names: list[str], n: int, seed: int) -> tuple[str, ...]:
    """The first n of a seed-determined order of all experts: every method gets the same picks,
    and for one seed the picks grow by adding experts."""
    order = sorted(names)
    random.Random(f"mergelab-grid:{seed}").shuffle(order)
    return tuple(order[:n])


def plan_cells(spec: GridSpec) -> list[Cell]:
    names = [e.name for e in spec.experts]
    return [Cell(m.name, n, seed, pick_experts(names, n, seed))
            for n in spec.n_experts for seed in spec.seeds for m in spec.methods]


def merge_config(spec: GridSpec, method_name: str, experts: tuple[str, ...]) -> dict:
    method = next(m for m in spec.methods if m.name == method_name)
    models = {e.name: e.model for e in spec.experts}
    parameters = method.parameters_for(len(experts))
    registered = get_method(method.merge_method)
    if registered.param("weight") is not None and registered.param("weight").required:
        parameters.setdefault("weight", 1.0)  # the grid weighs its experts equally unless the spec says otherwise
    config = {"merge_method": method.merge_method, "models": [{"model": models[e]} for e in experts],
              "parameters": parameters}
    if registered.uses_base:
        config["base_model"] = spec.base
    from mergelab.vocab import union_if_vocabularies_differ  # experts that differ only by added tokens

    config.update(union_if_vocabularies_differ([spec.base, *(models[e] for e in experts)]))
    return config


def run_cell(spec_data: dict, cell_data: dict, models_dir: str, keep_models: bool = False) -> list[dict]:
    """Merge and evaluate one cell; plain data in and out, so it can run as a Ray task."""
    from mergelab import merge

    spec = GridSpec.model_validate(spec_data)
    cell = Cell(**{**cell_data, "experts": tuple(cell_data["experts"])})
    tasks = load_tasks(spec.tasks)
    own = {e.task for e in spec.experts if e.name in cell.experts}
    chosen = [t for t in tasks if t.split != "held_in" or t.name in own]
    target = Path(models_dir) / f"{cell.method}-n{cell.n_experts}-s{cell.seed}"
    method = next(m for m in spec.methods if m.name == cell.method)
    aware = DATA_AWARE.get(method.merge_method)
    if aware is None:
        merge(merge_config(spec, cell.method, cell.experts), target, force=True, quiet=True, seed=cell.seed)
    else:  # learns from the picked experts' train splits; statistics cached in OUT/stats, beside models/
        experts = {e.name: e for e in spec.experts}
        picked = [GridExpert(name, experts[name].model, experts[name].train) for name in cell.experts]
        aware.merge(spec.base, picked, method.parameters_for(len(picked)), target, Path(models_dir).parent / "stats",
                    cell.seed)
    try:
        rows = evaluate_models([target], chosen, batch_size=spec.batch_size, progress=False)
    finally:
        if not keep_models:
            shutil.rmtree(target, ignore_errors=True)
    return [{"method": cell.method, "n_experts": cell.n_experts, "seed": cell.seed, "experts": ";".join(cell.experts),
             "task": r["task"], "category": r["category"], "split": r["split"], "score": r["score"]} for r in rows]


def reference_rows(spec: GridSpec, tasks, workers: int | WorkerPool | None = 1) -> list[dict]:
    """Base on every task, each expert on its own task, multitask on every task (one model per
    unit of work)."""
    by_name = {t.name: t for t in tasks}
    units = [(spec.base, tasks, "base", "")]
    units += [(expert.model, [by_name[expert.task]], "expert", expert.name) for expert in spec.experts]
    if spec.multitask:
        units.append((spec.multitask, tasks, "multitask", ""))
    with worker_pool(workers) as pool:
        scored = pool.map(score_reference, [(model, chosen, spec.batch_size) for model, chosen, _, _ in units])
    return [{"method": method, "n_experts": "", "seed": "", "experts": experts, "task": r["task"],
             "category": r["category"], "split": r["split"], "score": r["score"]}
            for (_, _, method, experts), rows in zip(units, scored) for r in rows]


def score_reference(model: str, tasks, batch_size: int) -> list[dict]:
    """One reference model's scores (a unit of work)."""
    return evaluate_models([model], tasks, batch_size=batch_size, progress=False)


def add_normalized(rows: list[dict], tasks) -> None:
    """Fill reference_score and normalized: held-in ÷ the task's expert, held-out ÷ the base.

    The value comes from ``normalized_performance``, the rule ``table.md`` uses too: blank
    only where it is undefined (no reference, a reference of 0, or a loss of 0).
    """
    by_name = {t.name: t for t in tasks}
    base = {r["task"]: float(r["score"]) for r in rows if r["method"] == "base"}
    expert = {r["task"]: float(r["score"]) for r in rows if r["method"] == "expert"}
    for row in rows:
        task = by_name[row["task"]]
        result = normalized_performance({task.name: float(row["score"])}, [task], expert, base)["tasks"][task.name]
        row["reference_score"] = "" if result["reference"] is None else result["reference"]
        row["normalized"] = "" if result["normalized"] is None else result["normalized"]


def read_results(path: Path) -> list[dict]:
    """The rows of an earlier run (to resume), or none; a file that is not a grid's results is refused."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error):
        rows, reader = None, None
    if reader is None or tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
        raise MergelabError(f"{path} is not the results file of a grid (expected the columns "
                            f"{','.join(RESULT_COLUMNS)}); remove it or choose another --out")
    return rows


def run_grid(spec: GridSpec | str | Path | dict, out_dir: str | Path, *, executor: str = "local",
             address: str | None = None, keep_models: bool = False, threads: int | None = None,
             workers: int | WorkerPool | None = None, log: Callable[[str], None] = print) -> Path:
    """Run every cell not already in ``out_dir/results.csv``; write results, table and plots.

    Args:
        workers: with the local executor, the processes that score the reference models and
            run the cells (None: the usable cores; 1: in this process; or a shared
            ``WorkerPool``). Each cell has its own seed, so the results are the same for any
            number of workers.
        threads: torch threads per worker (default 1: fastest for small models, and one per
            core with the default workers). Ray workers run one thread per task.

    Example:
        >>> run_grid("grid.yml", "grid-out")  # doctest: +SKIP
    """
    spec = spec if isinstance(spec, GridSpec) else load_spec(spec)
    tasks = validate_spec(spec)
    if executor not in ("local", "ray"):
        raise MergelabError(f"executor '{executor}' is not known; use local or ray")
    if not isinstance(workers, WorkerPool):
        workers = check_workers(workers)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MergelabError(f"threads must be a whole number, 1 or more; got {threads!r}")
    out_dir = Path(out_dir)
    created = _make_output_dir(out_dir, [spec.base, spec.multitask, *(e.model for e in spec.experts)])
    results = out_dir / "results.csv"
    try:
        with worker_pool(workers, threads or 1) as pool:
            return _run(spec, tasks, out_dir, results, executor, address, keep_models, pool, log)
    except BaseException:
        if created is not None and not results.exists():  # nothing worth resuming: leave nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise


def _make_output_dir(out_dir: Path, inputs: list[str | None]) -> Path | None:
    """Create (or reuse, to resume) the grid's output directory; the topmost directory created, if any.

    An existing file, a location that cannot be written, or one inside an input model is a
    user error naming the path (``check_output_dir``), found before any model is scored.
    """
    check_output_dir(out_dir, force=True, inputs=[model for model in inputs if model is not None])
    missing = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergelabError(f"cannot create the grid output {out_dir}: {exc.strerror or exc}") from None
    return missing[-1] if missing else None


def _run(spec: GridSpec, tasks, out_dir: Path, results: Path, executor: str, address: str | None,
         keep_models: bool, pool: WorkerPool, log: Callable[[str], None]) -> Path:
    rows = read_results(results)
    if not any(r["method"] == "base" for r in rows):
        log("  scoring the reference models (base, experts, multitask)")
        rows += reference_rows(spec, tasks, pool)
        add_normalized(rows, tasks)
        write_rows(rows, results, RESULT_COLUMNS)
    done = {(r["method"], str(r["n_experts"]), str(r["seed"])) for r in rows}
    cells = [c for c in plan_cells(spec) if c.key not in done]
    where = f"{pool.workers} worker{'s' * (pool.workers > 1)}" if executor == "local" else "Ray"
    log(f"  {len(cells)} cells to run ({len(plan_cells(spec)) - len(cells)} already done) on {where}")
    models_dir = out_dir / "models"
    for finished, cell_rows in enumerate(_execute(spec, cells, models_dir, keep_models, executor, address, pool), 1):
        rows += cell_rows
        add_normalized(rows, tasks)
        write_rows(rows, results, RESULT_COLUMNS)
        log(f"  [{finished}/{len(cells)}] {cell_rows[0]['method']} n={cell_rows[0]['n_experts']} "
            f"seed={cell_rows[0]['seed']}")
    if not keep_models and models_dir.exists() and not any(models_dir.iterdir()):
        models_dir.rmdir()
    from mergelab.experiments.report import write_report

    write_report(rows, tasks, out_dir)
    return results


def _execute(spec: GridSpec, cells: list[Cell], models_dir: Path, keep_models: bool, executor: str,
             address: str | None, pool: WorkerPool):
    """Each cell's rows, in the order of ``cells`` (so results.csv is the same for any workers)."""
    spec_data = spec.model_dump()
    if executor == "local":
        yield from pool.imap(run_cell, [(spec_data, asdict(cell), str(models_dir), keep_models) for cell in cells])
        return
    try:
        import ray
    except ImportError:
        raise MergelabError("--executor ray needs Ray: pip install 'mergelab[distributed]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False) if address else \
                ray.init(include_dashboard=False, log_to_driver=False)
        except ConnectionError as exc:
            raise MergelabError(f"cannot connect to the Ray cluster at {address}: {first_line(exc)}") from None
    try:
        remote = ray.remote(run_cell)
        pending = [remote.remote(spec_data, asdict(cell), str(models_dir.absolute()), keep_models) for cell in cells]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started_here:
            ray.shutdown()
