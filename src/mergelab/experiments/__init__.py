"""Experiment grids (merging-at-scale): method × number of experts × seed, evaluated held-in
and held-out, normalized, with tables and plots; locally or on Ray."""

from mergelab.experiments.report import markdown_table, plot_grid, summarize, write_report
from mergelab.experiments.runner import RESULT_COLUMNS, Cell, pick_experts, plan_cells, run_grid
from mergelab.experiments.spec import GridSpec, load_spec, validate_spec

__all__ = ["GridSpec", "load_spec", "validate_spec", "run_grid", "plan_cells", "pick_experts", "Cell",
           "RESULT_COLUMNS", "summarize", "markdown_table", "plot_grid", "write_report", "demo_spec"]


def demo_spec(world, n_experts=(2, 4), seeds=(0, 1)) -> GridSpec:
    """The built-in grid over the demo world: averaging, task arithmetic, TIES and DARE-TIES."""
    return GridSpec(
        base=str(world.base),
        experts=[{"name": name, "model": str(path), "task": name} for name, path in world.experts.items()],
        methods=[
            {"name": "averaging", "merge_method": "linear"},
            {"name": "task_arithmetic", "merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
            {"name": "ties", "merge_method": "ties", "parameters": {"density": 0.5, "lambda": 1.0}},
            {"name": "dare_ties", "merge_method": "dare_ties", "parameters": {"density": 0.5, "lambda": 1.0}},
        ],
        n_experts=list(n_experts), seeds=list(seeds), tasks=str(world.tasks_file("test")),
        multitask=str(world.multitask), batch_size=64,
    )
