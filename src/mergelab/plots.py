"""Figures without pyplot (no global backend, no GUI), saved atomically."""

from __future__ import annotations

from pathlib import Path


def new_figure(columns: int = 1, size: tuple[float, float] = (5, 3.5)):
    """(figure, list of axes) on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, columns, i + 1) for i in range(columns)]
    return figure, axes


def save_figure(figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a PNG next to ``path`` and rename it into place (no half-written image)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    figure.tight_layout()
    figure.savefig(partial, dpi=dpi, format="png")
    partial.replace(path)
    return path
