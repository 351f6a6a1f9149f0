"""Experiment grids (merging-at-scale): method × number of experts × seed, evaluated held-in
and held-out, normalized, with tables and plots; locally or on Ray."""

from mergelab.experiments.report import markdown_table, plot_grid, summarize, write_report
from mergelab.experiments.runner import RESULT_COLUMNS, Cell, pick_experts, plan_cells, run_grid
from mergelab.experiments.spec import GridSpec, load_spec, validate_spec

__all__ = ["GridSpec", "load_spec", "validate_spec", "run_grid", "plan_cells", "pick_experts", "Cell",
           "RESULT_COLUMNS", "summarize", "markdown_table", "plot_grid", "write_report"]

