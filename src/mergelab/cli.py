"""The `mergelab` command: each subcommand parses, calls the Python API, prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Torch's CPU allocator backs large tensors with transparent huge pages when this is set
# before torch is imported: merges allocate hundreds of MB per tensor, and faulting those
# pages in 4 KB at a time cost ~30% of a 748M-parameter merge (benchmarks/README.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import dataclasses

import click

from mergelab.config import MergeOptions
from mergelab.errors import MergelabError


class _Group(click.Group):
    """Print a MergelabError as `error: ...` (no traceback) and exit 2.

    An ``OSError`` that escaped the library's own checks (a file system refusing a write or a
    read) is a fault of the environment, not a bug: it is printed the same way. SIGTERM is
    turned into ``SystemExit(143)`` so that every command cleans up its temporary files as it
    does for Ctrl-C.
    """

    def invoke(self, ctx):
        import signal

        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        _show_library_notes()
        try:
            return super().invoke(ctx)
        except MergelabError as exc:
            first, *rest = str(exc).strip().splitlines() or ["(no message)"]
            click.echo(f"error: {first}", err=True)
            for line in rest:  # a hint, indented under the one error line
                if line.strip():
                    click.echo(f"  {line.strip()}", err=True)
            sys.exit(2)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}; check the path, its permissions and free space",
                       err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            sys.exit(130)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _show_library_notes() -> None:
    """The library reports things worth knowing (a stale temporary directory removed, ...) on
    the ``mergelab`` logger; the CLI prints them as ``note: ...`` lines on stderr."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        def emit(self, record):
            self.setStream(sys.stderr)  # whatever stderr is now (click's test runner swaps it)
            super().emit(record)

    logger = logging.getLogger("mergelab")
    if not any(isinstance(h, CurrentStderr.__mro__[1]) and h.get_name() == "mergelab-cli" for h in logger.handlers):
        handler = CurrentStderr(sys.stderr)
        handler.set_name("mergelab-cli")
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@click.group(cls=_Group)
@click.version_option(package_name="mergelab")
def main() -> None:
    """Merge checkpoints, pick merge weights, keep old skills, and measure it all."""
    # Nothing here imports torch or transformers: `mergelab --help` and early user errors stay fast.


class _ThreadsType(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        from mergelab.threads import check_threads

        try:
            return check_threads(value, "--threads")
        except MergelabError as exc:
            self.fail(str(exc), param, ctx)


# For the commands that run models; the policy behind "auto" is mergelab.threads.auto_threads.
_threads_option = click.option(
    "--threads", default="auto", show_default=True, type=_ThreadsType(),
    help="torch CPU threads: a number, or auto (1 for models under 100M parameters or on a busy machine, "
         "else the idle cores).")


def options_from(cls):
    """Click options generated from a dataclass: one per field, ``--field-name``, with the
    field's default and its ``metadata["help"]``; a bool that defaults to False is a flag."""

    def decorate(command):
        for spec in reversed(dataclasses.fields(cls)):
            name, help_text = "--" + spec.name.replace("_", "-"), spec.metadata.get("help")
            if spec.default is False:
                command = click.option(name, spec.name, is_flag=True, help=help_text)(command)
            else:
                command = click.option(name, spec.name, default=spec.default, show_default=True,
                                       help=help_text)(command)
        return command

    return decorate


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@options_from(MergeOptions)
def merge(config: Path, out_dir: Path, **options) -> None:
    """Merge the models a mergekit-style CONFIG.yml describes into OUT_DIR."""
    from mergelab.config import load_config

    config = load_config(config)  # a bad or missing YAML is reported before torch is imported
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
    from mergelab.inspection import format_report, inspect_task_vectors

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
@click.option("--tokenizer", default=None, type=click.Path(path_type=Path),
              help="Use this directory's tokenizer (for a model saved without one).")
@_threads_option
def fisher(model_dir, data, out, samples, max_length, device, force, tokenizer, threads) -> None:
    """Estimate the diagonal Fisher of a causal LM on DATA (for `merge_method: fisher`)."""
    from mergelab.fisher import estimate_fisher, read_texts

    path = estimate_fisher(model_dir, read_texts(data), out, max_samples=samples, max_length=max_length,
                           device=device, force=force, tokenizer=tokenizer, threads=threads)
    click.echo(f"Fisher written to {path}")


@main.command(name="regmean-stats")
@click.argument("model_dir")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="Task records (JSONL/JSON/YAML): {input, output}, {input, options, answer}, {text} or strings.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Statistics .safetensors to write (one [in, in] Gram per linear weight).")
@click.option("--examples", default=256, show_default=True, help="Use the first this many records.")
@click.option("--max-length", default=512, show_default=True, help="Tokens kept of each record.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite --out.")
@click.option("--tokenizer", default=None, type=click.Path(path_type=Path),
              help="Use this directory's tokenizer (for a model saved without one).")
@click.option("--quiet", is_flag=True)
@_threads_option
def regmean_stats(model_dir, data, out, examples, max_length, batch_size, device, force, tokenizer, quiet,
                  threads) -> None:
    """Compute MODEL_DIR's input Gram matrices X^T X on DATA (for `merge_method: regmean`, `gram: FILE`)."""
    from mergelab.grams import regmean_stats as run

    path = run(model_dir, data, out, examples=examples, max_length=max_length, batch_size=batch_size, device=device,
               force=force, tokenizer=tokenizer, threads=threads, quiet=quiet)
    click.echo(f"statistics written to {path}")


@main.command()
@click.option("--base", "base", required=True, help="The model the experts were fine-tuned from.")
@click.option("--model", "models", multiple=True, required=True, help="An expert model (repeatable; one --data each).")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="The unlabeled inputs of the --model before it: task records (their 'input' fields).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Merged model directory.")
@click.option("--mode", default="task", show_default=True, type=click.Choice(["task", "layer"]),
              help="task: one λ per model; layer: one per model and block (embeddings, norm, lm_head: their own).")
@click.option("--positions", default="last", show_default=True, type=click.Choice(["last", "all"]),
              help="Entropy of the prediction after each input (over its options, if any), or at every token.")
@click.option("--steps", default=500, show_default=True, help="Adam steps.")
@click.option("--lr", default=1e-3, show_default=True, help="Adam's learning rate.")
@click.option("--init", default=0.3, show_default=True, help="Every λ's starting value.")
@click.option("--examples", default=256, show_default=True, help="Inputs per model.")
@click.option("--batch-size", default=16, show_default=True, help="Inputs per model per step.")
@click.option("--max-length", default=512, show_default=True, help="Tokens kept of each input.")
@click.option("--max-params", default=200_000_000, show_default=True,
              help="Refuse larger models (the base and every task vector are held in memory).")
@click.option("--seed", default=0, show_default=True, help="Seed of the batches drawn each step.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the merge succeeded).")
@click.option("--quiet", is_flag=True)
@_threads_option
def adamerging(base, models, data, out, **options) -> None:
    """AdaMerging: learn task arithmetic's λ (per model, or per model and layer) by minimizing the
    entropy of the merged model's predictions on each model's unlabeled inputs; write the merge."""
    if len(models) != len(data):
        raise MergelabError(f"give one --data per --model (got {len(models)} --model and {len(data)} --data)")
    from mergelab.adamerging import adamerging as run

    result = run(base, list(zip(models, data)), out, **options)
    for model, row in zip(models, result.lambdas):
        click.echo(f"{model}: λ = " + ", ".join(f"{value:.4f}" for value in row))
    click.echo(f"entropy {result.entropy_before:.4f} at λ = {options['init']}, {result.entropy_after:.4f} learned")
    click.echo(f"merged model written to {out}")


@main.command(name="eval")
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tasks", "tasks", default=None, type=click.Path(path_type=Path), help="Tasks YAML/JSON file.")
@click.option("--backend", default="mergelab", show_default=True, type=click.Choice(["mergelab", "lm-eval", "mteb"]),
              help="What runs --tasks: our evaluators, lm-evaluation-harness or MTEB (extra: harness).")
@click.option("--lm-eval", "lm_eval_tasks", multiple=True, help="An lm-eval task name (repeatable).")
@click.option("--lm-eval-include", default=None, type=click.Path(path_type=Path),
              help="Folder of your own lm-eval YAML tasks, for --lm-eval.")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="results.json or results.csv")
@click.option("--tokenizer", default=None, type=click.Path(path_type=Path),
              help="Use this directory's tokenizer for every model (for models saved without one).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True)
@_threads_option
def evaluate(model_dirs, tasks, backend, lm_eval_tasks, lm_eval_include, out, tokenizer, batch_size, device,
             quiet, threads) -> None:
    """Score MODEL_DIRS (loaded one at a time) on the tasks of a tasks file and/or lm-eval tasks."""
    from mergelab.evaluate.adapters import evaluate_with_backend

    rows = evaluate_with_backend(model_dirs, tasks, backend=backend, lm_eval_tasks=lm_eval_tasks,
                                 lm_eval_include=lm_eval_include, out=out, batch_size=batch_size, device=device,
                                 progress=not quiet, tokenizer=tokenizer, threads=threads)
    width = max((len(r["model"]) for r in rows), default=0)
    for row in rows:
        click.echo(f"{row['model']:{width}}  {row['task']:24} {row['metric']:12} {row['score']:.4f}")
    if out:
        click.echo(f"results written to {out}")


@main.group()
def cocktail() -> None:
    """LM-Cocktail: merge weights from a few examples, and the resilient model."""


# Every cocktail option, once: (the subcommands it applies to, its click declaration). The loss
# options are generated from LossOptions' fields, so the CLI cannot drift from the API.
_ALL = ("merge", "weights", "sweep")


def _cocktail_option_table() -> list[tuple[tuple[str, ...], object]]:
    from dataclasses import MISSING, fields

    from mergelab.cocktail.options import LossOptions

    table = [
        (_ALL, click.option("--finetuned", default=None, help="M_t: the model fine-tuned on the target task.")),
        (_ALL, click.option("--base", default=None, help="M_b: the base model.")),
        (_ALL, click.option("--peer", "peers", multiple=True, help="A model fine-tuned on another task (repeatable).")),
        (_ALL, click.option("--examples", "examples", multiple=True, type=click.Path(path_type=Path),
                            help="JSON/JSONL few-shot examples; repeat for several tasks (unified recipe).")),
        (_ALL, click.option("--recipe", default="auto", show_default=True,
                            type=click.Choice(["auto", "full", "mono", "no_finetune", "unified", "blackbox"]))),
        (("merge", "weights"), click.option("--alpha", default=0.5, show_default=True,
                                            help="Weight of the fine-tuned model.")),
        (("merge",), click.option("--output", default="model", show_default=True,
                                  type=click.Choice(["model", "adapter"]), help="adapter: the models are PEFT adapters of one base; write their cocktail as "
                                       "one adapter.")),
        (_ALL, click.option("--temperature", default=5.0, show_default=True, help="τ of the softmax over -loss.")),
        (_ALL, click.option("--model-type", default="decoder", show_default=True,
                            type=click.Choice(["decoder", "encoder"]))),
        (_ALL, click.option("--tokenizer", default=None, type=click.Path(path_type=Path),
                            help="Use this directory's tokenizer for every model (for models saved without one).")),
    ]
    for spec in fields(LossOptions):
        default = None if spec.default is MISSING else spec.default
        choices = spec.metadata.get("choices")
        kind = click.Choice(choices) if choices else (type(default) if default is not None else int)
        table.append((_ALL, click.option(f"--{spec.name.replace('_', '-')}", spec.name, default=default, type=kind,
                                         show_default=default not in (None, ""), help=spec.metadata["help"])))
    table += [
        (_ALL, click.option("--batch-size", default=8, show_default=True)),
        (_ALL, click.option("--budget", default=40, show_default=True, help="Black-box optimizer evaluations.")),
        (_ALL, click.option("--device", default="cpu", show_default=True)),
        (_ALL, _threads_option),
    ]
    return table


def _cocktail_options(subcommand: str):
    """Decorate a cocktail subcommand with exactly the options that apply to it."""

    def decorate(command):
        for applies, option in reversed(_cocktail_option_table()):
            if subcommand in applies:
                command = option(command)
        return command

    return decorate


def _cocktail_kwargs(examples, **kwargs) -> dict:
    """The cocktail API's keyword arguments from the parsed options (loss options as one LossOptions)."""
    from mergelab.cocktail import load_examples
    from mergelab.cocktail.options import LossOptions

    checks = {"model_type": kwargs["model_type"], "neg_number": kwargs["neg_number"]}
    if len(examples) == 1:
        kwargs["examples"] = load_examples(examples[0], **checks)
    elif examples:
        kwargs["examples"] = {str(path): load_examples(path, **checks) for path in examples}
    loss = {name: kwargs.pop(name) for name in LossOptions.field_names()}
    return {**kwargs, "options": LossOptions(**loss)}


@cocktail.command(name="merge")
@click.argument("out_dir", type=click.Path(path_type=Path))
@_cocktail_options("merge")
@click.option("--force", is_flag=True)
@click.option("--quiet", is_flag=True)
def cocktail_merge(out_dir, **options) -> None:
    """Compute the weights and write the merged model to OUT_DIR."""
    from mergelab.cocktail import cocktail as run

    result = run(out_dir, **_cocktail_kwargs(**options))
    click.echo(result.table())
    click.echo(f"merged model written to {out_dir}")


@cocktail.command(name="weights")
@_cocktail_options("weights")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cocktail_weights(as_json, **options) -> None:
    """Print the few-shot losses and merge weights only (nothing is written)."""
    from dataclasses import asdict

    from mergelab.cocktail import cocktail as run

    result = run(None, **_cocktail_kwargs(**options))
    click.echo(json.dumps(asdict(result), indent=2) if as_json else result.table())


@cocktail.command(name="sweep")
@click.argument("out_dir", type=click.Path(path_type=Path))
@_cocktail_options("sweep")
@click.option("--tasks", "tasks", required=True, type=click.Path(path_type=Path), help="Tasks file to score.")
@click.option("--target", "target", multiple=True, required=True, help="Target task name(s).")
@click.option("--alphas", default=None, help="Comma-separated α values (default 0,0.1,...,1).")
@click.option("--keep-models", is_flag=True)
def cocktail_sweep(out_dir, tasks, target, alphas, keep_models, **options) -> None:
    """Merge at several α, score target vs other tasks, write sweep.csv and sweep.png."""
    from mergelab.cocktail import alpha_sweep
    from mergelab.cocktail.sweep import DEFAULT_ALPHAS

    try:
        grid = [float(a) for a in alphas.split(",")] if alphas else DEFAULT_ALPHAS
    except ValueError:
        raise MergelabError(f"--alphas must be comma-separated numbers like 0,0.5,1; got '{alphas}'") from None
    rows = alpha_sweep(out_dir, tasks=tasks, target=target, alphas=grid, keep_models=keep_models,
                       **_cocktail_kwargs(**options))
    for row in rows:
        click.echo(f"alpha {row['alpha']:4.2f}  target {row['target']:.4f}  general {row['general']:.4f}")
    click.echo(f"curve written to {Path(out_dir) / 'sweep.png'}")


_workers_option = click.option(
    "--workers", type=int, default=None,
    help="Processes for the independent work (grid cells, experts, seeds), one torch thread each; the results do "
         "not depend on it.  [default: the usable cores]")


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@click.option("--demo", is_flag=True, help="Run the built-in grid on the demo world (built and cached if needed).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path))
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]))
@click.option("--address", default=None, help="Address of an existing Ray cluster (default: start a local one).")
@click.option("--keep-models", is_flag=True, help="Keep each merged model under OUT/models.")
@click.option("--methods", default=None, metavar="A,B,...",
              help="With --demo: the methods to run (registry methods, presets, averaging), with the demo's "
                   "parameters.  [default: averaging,task_arithmetic,ties,dare_ties]")
@click.option("--n-experts", default=None, metavar="N,N,...", help="With --demo: numbers of experts.  [default: 2,4]")
@click.option("--seeds", default=None, metavar="S,S,...",
              help="With --demo: seeds of the expert picks.  [default: 0,1]")
@_workers_option
def grid(spec, demo, out, executor, address, keep_models, methods, n_experts, seeds, workers) -> None:
    """Run a merging grid (method × n_experts × seed) from SPEC.yml, or --demo."""
    from mergelab.experiments import run_grid
    from mergelab.parallel import check_workers

    if demo == (spec is not None):
        raise MergelabError("give either a SPEC file or --demo (not both)")
    if spec is not None and (methods, n_experts, seeds) != (None, None, None):
        raise MergelabError("--methods, --n-experts and --seeds choose the --demo grid; a SPEC file states its own")
    workers = check_workers(workers, "--workers")
    if demo:
        from mergelab.demo import demo_spec
        from mergelab.demo.modern import demo_grid_settings
        from mergelab.demo.world import build_world

        settings = demo_grid_settings(methods, n_experts, seeds)  # checked before the world is built
        spec = demo_spec(build_world(workers=workers), **settings)
    results = run_grid(spec, out, executor=executor, address=address, keep_models=keep_models,
                       threads=1 if demo else None, workers=workers)
    click.echo((Path(out) / "table.md").read_text())
    click.echo(f"results in {results}; plot in {Path(out) / 'grid.png'}")


@main.command()
def methods() -> None:
    """List the merge methods, their parameters and papers, and the papers' presets."""
    from mergelab.methods import METHODS, PRESETS

    for method in METHODS.values():
        params = ", ".join(_describe_param(p) for p in method.params) or "none"
        click.echo(f"{method.name:16} {method.summary}\n{'':16} models: {_describe_models(method)}\n"
                   f"{'':16} params: {params}   (* per model)\n{'':16} paper: {method.paper}")
    click.echo("\npresets (the papers' settings; a grid method may name one with `preset:`):")
    for preset in PRESETS.values():
        settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in preset.settings(4).items())
        click.echo(f"{preset.name:22} {preset.method}: {settings} (for 4 models)\n{'':22} {preset.source}")


def _describe_param(param) -> str:
    value = "PATH" if param.tensor_file else "required" if param.required else param.default
    return f"{param.name}={value}" + ("*" if param.per_model else "") + (" (ignored)" if param.ignored else "")


def _describe_models(method) -> str:
    low, high = method.min_models, method.max_models
    count = f"exactly {low}" if low == high else f"{low} or more" if high is None else f"{low} to {high}"
    if method.optional_base:
        return f"{count}; base_model optional (with it, task vectors are merged; it never counts as a model)"
    if not method.uses_base:
        return f"{count}; base_model not used"
    first = " (without base_model, the first listed model is the base)" if method.first_model_is_base else ""
    return f"base_model + {count} other{'s' if high != 1 else ''}{first}"


@main.command()
@click.option("--out", "out", default="mergelab-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="A much smaller world and shorter runs (a smoke test, not a result).")
@click.option("--quiet", is_flag=True)
@click.option("--study", "studies", multiple=True, type=click.Path(path_type=Path),
              help="An output directory of 'mergelab study scale' or 'study sfa' (repeatable): its verdicts go into "
                   "the report's 'scale and regime' section.")
@click.option("--full", is_flag=True, help="Also run the modern methods (tsv, iso_c, iso_cts, regmean, adamerging) "
                                           "beside the seed paper's four at 2, 4, 8 experts (beyond the 10-minute "
                                           "budget).")
@_workers_option
def demo(out: Path, quick: bool, quiet: bool, studies: tuple[Path, ...], full: bool, workers: int | None) -> None:
    """Re-run the three papers' central experiments on the built-in demo world; write a report."""
    from mergelab.demo import run_demo
    from mergelab.parallel import check_workers

    run_demo(out, quiet=quiet, quick=quick, workers=check_workers(workers, "--workers"), study=list(studies) or None,
             full=full)
    click.echo(f"report written to {Path(out) / 'report.md'}")


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@click.option("--digits", is_flag=True, help="Run the split-digits experiment (the paper's Figure 1) instead of a SPEC.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory for the results.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once everything succeeded).")
@click.option("--quiet", is_flag=True)
@_workers_option
@_threads_option
def sfa(spec, digits, out, force, quiet, workers, threads) -> None:
    """Train on the task stream a YAML SPEC describes with SFA and the baselines (or, with
    --digits, run the split-digits experiment); write results.json, results.md and plots."""
    from mergelab.continual import run_spec
    from mergelab.parallel import check_workers
    from mergelab.studies.digits import run_digits_experiment

    if digits == (spec is not None):
        raise MergelabError("give either a SPEC file or --digits (not both)")
    if workers is not None and not digits:
        raise MergelabError("--workers applies to --digits (its seeds run in parallel); a SPEC's stream runs in "
                            "one process")
    if threads != "auto" and digits:
        raise MergelabError("--threads applies to a SPEC's stream; --digits runs one torch thread per process")
    path = run_digits_experiment(out, force=force, quiet=quiet, workers=check_workers(workers, "--workers")) \
        if digits else run_spec(spec, out, force, quiet, threads=threads)
    click.echo(f"results written to {path}")


# -- studies (mergelab.studies) --------------------------------------------------------------
@main.group()
def study() -> None:
    """Studies that vary the demo world along the papers' axes and test each claim along them."""


@study.command(name="sfa")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory for the results.")
@click.option("--quick", is_flag=True, help="The quick world, short streams, few conditions (a smoke test).")
@click.option("--regimes", default="plain,pretrained", show_default=True,
              help="Regimes to compare (plain always runs); without pretrained its world is not built.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once everything succeeded).")
@click.option("--quiet", is_flag=True)
@_workers_option
def study_sfa(out: Path, quick: bool, regimes: str, force: bool, quiet: bool, workers: int | None) -> None:
    """SFA on the demo LM stream (add, then sub): which training length, β, p, learning rate and
    regime give the paper's behaviour (forgets less, learns the new task about as well)."""
    from mergelab.parallel import check_workers
    from mergelab.studies.sfa_lm import run_sfa_study

    run_sfa_study(out, quick=quick, workers=check_workers(workers, "--workers"), force=force, quiet=quiet,
                  regimes=tuple(r.strip() for r in regimes.split(",") if r.strip()))
    click.echo(f"report written to {Path(out) / 'report.md'}")


@study.command(name="scale")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory for the study.")
@click.option("--quick", is_flag=True, help="Tiny worlds, two n values, two seeds (a smoke test, not a result).")
@click.option("--seeds", default=None, help="Comma-separated seeds, two or more (default 0,1,2; --quick 0,1).")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="Where the grid cells run.")
@click.option("--address", default=None, help="Address of an existing Ray cluster (default: start a local one).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once everything succeeded).")
@click.option("--quiet", is_flag=True)
@_workers_option
def study_scale(out, quick, seeds, executor, address, force, quiet, workers) -> None:
    """Merging at scale along model size and base kind (plain, instruction-tuned, pretrained):
    sizes × base kinds × 4 methods × n_experts {2,4,6,8} × seeds, and LM-Cocktail on each world
    (docs/scale-study.md); writes report.md, results.json, verdicts.json and figures."""
    from mergelab.studies.scale import run_scale_study

    if seeds is not None:
        try:
            seeds = [int(s) for s in seeds.split(",")]
        except ValueError:
            raise MergelabError(f"--seeds must be comma-separated whole numbers like 0,1,2; got '{seeds}'") from None
    results = run_scale_study(out, quick=quick, seeds=seeds, workers=workers, executor=executor, address=address,
                              force=force, log=(lambda *_: None) if quiet else click.echo)
    for claim in results["claims"] + results["cocktail_claims"]:
        click.echo(claim["line"])
    click.echo(f"report written to {Path(out) / 'report.md'}")


# -- adapters (mergelab.adapters) ------------------------------------------------------------
@main.group()
def adapters() -> None:
    """LoRA/PEFT adapters: merge adapters into one, extract one from a fine-tune."""


@adapters.command(name="merge")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of DARE's random masks.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only after the merge succeeded).")
def adapters_merge(config: Path, out_dir: Path, seed: int, force: bool) -> None:
    """Merge the PEFT LoRA adapters a CONFIG.yml lists into one adapter in OUT_DIR
    (merge_method: a PEFT combination type such as linear, cat, svd, ties, dare_ties_svd)."""
    from mergelab.adapters.combine import merge_adapters_config
    from mergelab.config import load_config

    options = MergeOptions.from_kwargs(seed=seed, force=force)
    path = merge_adapters_config(load_config(config).model_copy(update={"output": "adapter"}), out_dir, options)
    click.echo(f"merged adapter written to {path}")


@adapters.command(name="extract")
@click.argument("finetuned")
@click.option("--base", required=True, help="The model FINETUNED was fine-tuned from.")
@click.option("--rank", type=int, default=None, help="LoRA rank of every layer.")
@click.option("--energy", type=float, default=None,
              help="Instead of --rank: per layer, keep this share of the task vector's squared norm (e.g. 0.9).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the extraction succeeded).")
@click.option("--quiet", is_flag=True)
def adapters_extract(finetuned: str, base: str, rank, energy, out: Path, force: bool, quiet: bool) -> None:
    """Extract a PEFT LoRA adapter that turns --base into FINETUNED (truncated SVD of each task
    vector); print each layer's rank and relative reconstruction error."""
    from mergelab.adapters.extract import extract_lora

    report = extract_lora(finetuned, base, out, rank=rank, energy=energy, force=force, quiet=quiet)
    if not quiet:
        width = max((len(m["name"]) for m in report["modules"]), default=6)
        click.echo(f"{'module':{width}}  rank  relative error")
        for module in report["modules"]:
            click.echo(f"{module['name']:{width}}  {module['rank']:>4}  {module['relative_error']:.4f}")
        if report["modules_to_save"]:
            click.echo(f"saved whole (modules_to_save): {', '.join(report['modules_to_save'])}")
    click.echo(f"adapter written to {out} (overall relative error {report['overall_relative_error']:.4f})")


if __name__ == "__main__":
    main()
