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


# One colour per method across every figure (tab10, then tab20's lighter shades); a method not
# listed gets a stable colour from its name.
_METHOD_ORDER = ("averaging", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "multitask",
                 "base", "sequential", "sfa", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
                 "tsv", "iso_c", "iso_cts", "regmean", "adamerging", "fisher", "slerp", "model_stock",
                 "lm_cocktail", "l2", "ewc", "rehearsal")


def method_color(name: str) -> str:
    """The colour of ``name`` (a method or reference model) in every mergelab figure."""
    from matplotlib import colormaps

    import zlib

    palette = [colormaps["tab10"](i) for i in range(10)] + [colormaps["tab20"](2 * i + 1) for i in range(10)]
    key = name.split("(")[0].strip().lower().replace("-", "_")
    index = _METHOD_ORDER.index(key) if key in _METHOD_ORDER else zlib.crc32(key.encode()) % len(palette)
    r, g, b, _ = palette[index % len(palette)]
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def integer_ticks(axis) -> None:
    """Whole-number ticks on the x axis (numbers of experts, tasks, steps)."""
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
