"""The `mergelab` command: each subcommand parses, calls the Python API, prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mergelab.errors import MergeError


class _Group(click.Group):
    """Print a MergeError as `error: ...` (no traceback) and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="mergelab")
def main() -> None:
    """Merge checkpoints, pick merge weights, keep old skills, and measure it all."""


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only after the merge succeeds).")
@click.option("--threads", default=1, show_default=True, help="Tensors merged concurrently.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--seed", default=0, show_default=True, help="Seed of DARE's random masks.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge(config: Path, out_dir: Path, **options) -> None:
    """Merge the models a mergekit-style CONFIG.yml describes into OUT_DIR."""
    from mergelab import merge as run

    click.echo(f"merged model written to {run(config, out_dir, **options)}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--base", "base", required=True, help="The model the others were fine-tuned from.")
@click.option("--density", default=0.2, show_default=True, help="TIES trim density for the sign-conflict rate.")
@click.option("--per-tensor", is_flag=True, help="Print one row per tensor, not only the totals.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(models, base, density, per_tensor, as_json) -> None:
    """Compare the task vectors of MODELS (relative to --base): cosine similarity and the
    TIES sign-conflict rate."""
    from mergelab.inspect import format_report, inspect_task_vectors

    report = inspect_task_vectors(base, list(models), density=density)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report, per_tensor=per_tensor))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="JSON/JSONL of texts: strings or objects with 'text' or 'input'/'output'.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Fisher .safetensors to write.")
@click.option("--samples", default=None, type=int, help="Use at most this many examples.")
@click.option("--max-length", default=512, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite --out.")
def fisher(model_dir, data, out, samples, max_length, device, force) -> None:
    """Estimate the diagonal Fisher of a causal LM on DATA (for `merge_method: fisher`)."""
    from mergelab.fisher import estimate_fisher, read_texts

    path = estimate_fisher(model_dir, read_texts(data), out, max_samples=samples, max_length=max_length,
                           device=device, force=force)
    click.echo(f"Fisher written to {path}")


@main.command(name="eval")
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tasks", "tasks", required=True, type=click.Path(path_type=Path), help="Tasks YAML/JSON file.")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="results.json or results.csv")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True)
def evaluate(model_dirs, tasks, out, batch_size, device, quiet) -> None:
    """Score MODEL_DIRS (loaded one at a time) on the tasks of a tasks file."""
    from mergelab.evaluate import evaluate_models, load_tasks

    rows = evaluate_models(model_dirs, load_tasks(tasks), out=out, batch_size=batch_size, device=device,
                           progress=not quiet)
    width = max(len(r["model"]) for r in rows)
    for row in rows:
        click.echo(f"{row['model']:{width}}  {row['task']:24} {row['metric']:12} {row['score']:.4f}")
    if out:
        click.echo(f"results written to {out}")


@main.command()
def methods() -> None:
    """List the merge methods, their parameters and papers."""
    from mergelab.methods import METHODS

    for method in METHODS.values():
        params = ", ".join(f"{p.name}={p.default}" + ("*" if p.per_model else "") for p in method.params)
        click.echo(f"{method.name:16} {method.summary}\n{'':16} params: {params}   (* per model)\n"
                   f"{'':16} {method.paper}")


@main.command()
@click.option("--out", "out", default="mergelab-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True)
def demo(out: Path, quiet: bool) -> None:
    """Build tiny Llama-shape checkpoints, merge them with every method, load and score each."""
    from mergelab.demo import run_demo

    run_demo(out, quiet=quiet)


if __name__ == "__main__":
    main()
