"""The α sweep of the LM-Cocktail paper's Figure 1: merge at α ∈ {0, 0.1, ..., 1} and score
each merge on the target task(s) and on everything else."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from mergelab.cocktail.loss import LossOptions
from mergelab.cocktail.recipes import check_cocktail, cocktail
from mergelab.errors import MergelabError
from mergelab.evaluate import evaluate_models, load_tasks, write_rows
from mergelab.outdir import check_output_dir
from mergelab.threads import Threads

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def alpha_sweep(out_dir: str | Path, *, finetuned: str | Path, base: str | Path | None = None,
                peers: Sequence[str | Path] = (), examples=None, tasks=None, target: Sequence[str] = (),
                evaluate: Callable[[Path], dict[str, float]] | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
                keep_models: bool = False, quiet: bool = True, recipe: str = "auto", temperature: float = 5.0,
                model_type: str = "decoder", options: LossOptions = LossOptions(),
                tokenizer: str | Path | None = None, batch_size: int = 8, device: str = "cpu", budget: int = 40,
                seed: int = 0, threads: Threads = "auto") -> list[dict]:
    """Merge at each α, evaluate, and write ``sweep.csv`` and ``sweep.png`` to ``out_dir``.

    Args:
        finetuned, base, peers, examples: as for ``cocktail`` (mono recipe when no examples).
        tasks: a tasks file or list of ``Task`` (scored with ``mergelab.evaluate``), or
        evaluate: a callable ``model_dir -> {task name: score}`` of your own.
        target: the task name(s) of the fine-tuned model's domain; the other tasks are "general".
        alphas: the grid (default 0, 0.1, ..., 1).
        keep_models: keep each merged model under ``out_dir/models``.
        recipe, temperature, model_type, options, tokenizer, batch_size, device, budget, seed, threads:
            as for ``cocktail``, at every α (``threads`` also for scoring the merges).

    Every input is checked before ``out_dir`` is created; a failed sweep removes the
    ``out_dir`` it created.

    Returns:
        Rows ``{"alpha", "target", "general", <task>: score ...}``.
    """
    if (tasks is None) == (evaluate is None):
        raise MergelabError("give either tasks (a tasks file) or an evaluate callable for the sweep")
    if not target:
        raise MergelabError("name the target task(s) of the fine-tuned model (--target)")
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise MergelabError(f"alphas must be a non-empty list within [0, 1], got {list(alphas)}")
    if tasks is not None and not isinstance(tasks, (list, tuple)):
        tasks = load_tasks(tasks)
    if tasks is not None:
        names = {t.name for t in tasks}
        missing = [t for t in target if t not in names]
        if missing:
            raise MergelabError(f"target task(s) {missing} are not in the tasks file ({', '.join(sorted(names))})")
    check_cocktail(finetuned=finetuned, base=base, peers=peers, examples=examples, recipe=recipe, alpha=alphas[0],
                   temperature=temperature, model_type=model_type, options=options, tokenizer=tokenizer,
                   batch_size=batch_size, device=device, threads=threads)  # the other α differ only in a range checked
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force=True, inputs=[m for m in (finetuned, base, *peers) if m is not None])
    missing = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    created = missing[-1] if missing else None  # the topmost directory this sweep creates
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        models_dir = out_dir / "models" if keep_models else Path(tempfile.mkdtemp(prefix=".sweep-", dir=out_dir))
    except OSError as exc:
        raise MergelabError(f"cannot create the sweep output {out_dir}: {exc.strerror or exc}") from None
    settings = dict(recipe=recipe, temperature=temperature, model_type=model_type, options=options,
                    tokenizer=tokenizer, batch_size=batch_size, device=device, budget=budget, seed=seed,
                    threads=threads)
    try:
        return _sweep(out_dir, models_dir, finetuned, base, peers, examples, tasks, target, evaluate, alphas,
                      keep_models, quiet, settings)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _sweep(out_dir, models_dir, finetuned, base, peers, examples, tasks, target, evaluate, alphas, keep_models,
           quiet, settings) -> list[dict]:
    rows = []
    try:
        for alpha in alphas:
            merged = models_dir / f"alpha-{alpha:g}"
            cocktail(merged, finetuned=finetuned, base=base, peers=peers, examples=examples, alpha=alpha,
                     force=True, quiet=quiet, **settings)
            if evaluate is not None:
                scores = evaluate(merged)
            else:
                scores = {r["task"]: r["score"] for r in evaluate_models([merged], tasks, progress=False,
                                                                         device=settings["device"],
                                                                         threads=settings["threads"])}
            general = [s for name, s in scores.items() if name not in target]
            rows.append({"alpha": alpha, "target": sum(scores[t] for t in target) / len(target),
                         "general": sum(general) / len(general) if general else float("nan"), **scores})
            if not keep_models:
                shutil.rmtree(merged, ignore_errors=True)
    finally:
        if not keep_models:
            shutil.rmtree(models_dir, ignore_errors=True)
    write_rows(rows, out_dir / "sweep.csv")
    plot_sweep(rows, out_dir / "sweep.png")
    return rows


def plot_sweep(rows: list[dict], path: Path) -> Path:
    """Target and general score against α (the paper's Figure 1)."""
    from mergelab.plots import new_figure, save_figure

    alphas = [r["alpha"] for r in rows]
    figure, (axis,) = new_figure()
    axis.plot(alphas, [r["target"] for r in rows], marker="o", label="target task")
    axis.plot(alphas, [r["general"] for r in rows], marker="s", label="other tasks (mean)")
    axis.set_xlabel("α (weight of the fine-tuned model)")
    axis.set_ylabel("score")
    axis.set_title("LM-Cocktail α sweep")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(figure, path)
