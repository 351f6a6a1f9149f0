"""How much do task vectors agree? Cosine similarities and the TIES sign-conflict rate,
streamed tensor by tensor, to judge a merge before running it."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import torch

from mergelab.engine import Source, check_tensors
from mergelab.errors import MergelabError
from mergelab.adapters.reader import open_reader
from mergelab.methods.sparsify import magnitude_mask


def inspect_task_vectors(base: str | Path, models: list[str | Path], density: float = 0.2) -> dict:
    """Compare the task vectors τ_i = θ_i − θ_base of ``models``.

    Args:
        base: the model the others were fine-tuned from (path or hub id).
        models: two or more fine-tuned models (or BASE+ADAPTER / PEFT adapter directories).
        density: TIES trim density applied before counting sign conflicts (1.0: no trim).

    Returns:
        ``{"overall": {...}, "tensors": [...]}`` where each part holds ``cosine`` (per model
        pair, "a | b" -> value), ``sign_conflict_rate`` (share of entries, among those where
        some trimmed τ_i is non-zero, whose non-zero values disagree in sign) and ``norm``
        (‖τ_i‖ per model).

    Example:
        >>> report = inspect_task_vectors("base", ["math", "code"])  # doctest: +SKIP
        >>> report["overall"]["cosine"]["math | code"]  # doctest: +SKIP
    """
    if len(models) < 2:
        raise MergelabError("inspect needs at least two fine-tuned models besides --base")
    if not 0 < density <= 1:
        raise MergelabError(f"--density must be in (0, 1], got {density}")
    labels = [str(m) for m in models]
    with contextlib.ExitStack() as stack:  # every reader is closed, also when a check fails
        sources = []
        for ref in [base, *models]:
            reader = open_reader(ref, label=str(ref))  # a model, BASE+ADAPTER or an adapter directory
            stack.callback(reader.close)
            sources.append(Source(str(ref), reader, {}))
        skipped = check_tensors(sources)
        base_source, experts = sources[0], sources[1:]
        pairs = list(itertools.combinations(range(len(experts)), 2))
        dots = torch.zeros(len(pairs), dtype=torch.float64)
        squares = torch.zeros(len(experts), dtype=torch.float64)
        conflicts = active = 0
        rows = []
        for name, info in base_source.reader.tensors.items():
            if not info.dtype.is_floating_point or name in skipped:
                continue
            theta_b = base_source.reader.get(name).float()
            deltas = [s.reader.get(name).float().sub_(theta_b).reshape(-1) for s in experts]  # (numel,) each
            pair_dots = [float(deltas[i].double() @ deltas[j].double()) for i, j in pairs]
            sq = [float(d.double() @ d.double()) for d in deltas]
            dots += torch.tensor(pair_dots, dtype=torch.float64)
            squares += torch.tensor(sq, dtype=torch.float64)
            positive = torch.zeros(theta_b.numel(), dtype=torch.bool)
            negative = torch.zeros_like(positive)
            for delta in deltas:
                trimmed = delta * magnitude_mask(delta, density)
                positive |= trimmed > 0
                negative |= trimmed < 0
            tensor_conflicts, tensor_active = int((positive & negative).sum()), int((positive | negative).sum())
            conflicts, active = conflicts + tensor_conflicts, active + tensor_active
            rows.append({
                "name": name,
                "cosine": _cosines(labels, pairs, pair_dots, sq),
                "sign_conflict_rate": tensor_conflicts / tensor_active if tensor_active else 0.0,
                "norm": {label: s ** 0.5 for label, s in zip(labels, sq)},
            })
    overall = {
        "cosine": _cosines(labels, pairs, dots.tolist(), squares.tolist()),
        "sign_conflict_rate": conflicts / active if active else 0.0,
        "norm": {label: s ** 0.5 for label, s in zip(labels, squares.tolist())},
    }
    return {"base": str(base), "models": labels, "density": density, "overall": overall, "tensors": rows}


def _cosines(labels, pairs, dots, squares) -> dict[str, float]:
    out = {}
    for (i, j), dot in zip(pairs, dots):
        denom = (squares[i] * squares[j]) ** 0.5
        out[f"{labels[i]} | {labels[j]}"] = dot / denom if denom > 0 else 0.0
    return out


def format_report(report: dict, per_tensor: bool = False) -> str:
    """A plain-text table of ``inspect_task_vectors``' result."""
    lines = [f"task vectors relative to {report['base']} (sign conflicts after TIES trim at density "
             f"{report['density']:g})", ""]
    rows = (report["tensors"] if per_tensor else []) + [{"name": "OVERALL", **report["overall"]}]
    pairs = list(report["overall"]["cosine"])
    width = max(len(r["name"]) for r in rows)
    header = f"{'tensor':{width}}  " + "  ".join(f"cos[{p}]" for p in pairs) + "  sign-conflict"
    lines.append(header)
    for row in rows:
        cells = "  ".join(f"{row['cosine'][p]:>{len(p) + 5}.4f}" for p in pairs)
        lines.append(f"{row['name']:{width}}  {cells}  {row['sign_conflict_rate']:>13.2%}")
    lines += ["", "task-vector norms: " + ", ".join(f"{k}={v:.4g}" for k, v in report["overall"]["norm"].items())]
    return "\n".join(lines)
