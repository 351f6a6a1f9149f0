"""LM-Cocktail recipes (paper §2): each turns models + a few examples into merge weights and
writes the resilient model through the streaming engine.

- ``full`` (Eq. 1): M_r = α·M_t + (1−α)·Σ w_i M_i over the base and peer models, w from Eq. 2;
- ``mono`` (Eq. 3): M_r = α·M_t + (1−α)·M_b, no examples needed;
- ``no_finetune``: M_r = Σ w_i M_i over the base and peers (no fine-tuned model);
- ``unified`` (LM-Cocktail^u): weights from the pooled examples of several tasks;
- ``blackbox``: w chosen by a gradient-free optimizer (nevergrad) minimizing the few-shot loss
  of the merged model itself, on the simplex (the paper's comparison point; LoraHub's approach).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from mergelab.cocktail.blackbox import blackbox_weights
from mergelab.cocktail.loss import LossOptions, check_examples
from mergelab.cocktail.weights import fewshot_losses, pooled, softmax_weights
from mergelab.errors import MergelabError
from mergelab.evaluate.runner import check_run_settings
from mergelab.adapters.loading import check_model_dir  # mergelab.loading's, plus adapter candidates
from mergelab.outdir import check_output_dir
from mergelab.threads import Threads, check_threads

RECIPES = ("full", "mono", "no_finetune", "unified", "blackbox")


@dataclass
class CocktailResult:
    """What a recipe decided (and wrote, when ``out_dir`` was given)."""

    recipe: str
    finetuned: str | None
    candidates: list[str]
    weights: list[float]
    losses: list[float] | None = None
    alpha: float | None = None
    out_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"recipe: {self.recipe}" + (f"   alpha (fine-tuned model): {self.alpha:g}" if self.finetuned else "")]
        if self.finetuned:
            lines.append(f"fine-tuned: {self.finetuned}")
        width = max(len(c) for c in self.candidates)
        lines.append(f"{'candidate':{width}}  {'loss':>9}  {'weight':>8}")
        for index, candidate in enumerate(self.candidates):
            loss = f"{self.losses[index]:9.4f}" if self.losses else f"{'-':>9}"
            lines.append(f"{candidate:{width}}  {loss}  {self.weights[index]:8.4f}")
        return "\n".join(lines)


def choose_recipe(finetuned, examples, recipe: str) -> str:
    if recipe != "auto":
        if recipe not in RECIPES:
            raise MergelabError(f"recipe '{recipe}' is not known; use one of {', '.join(RECIPES)} or auto")
        return recipe
    if isinstance(examples, Mapping):
        return "unified"
    if finetuned is not None and examples is None:
        return "mono"
    return "full" if finetuned is not None else "no_finetune"


def cocktail(out_dir: str | Path | None = None, *, finetuned: str | Path | None = None, base: str | Path | None = None,
             peers: Sequence[str | Path] = (), examples: Sequence[dict] | Mapping[str, Sequence[dict]] | None = None,
             recipe: str = "auto", alpha: float = 0.5, temperature: float = 5.0, model_type: str = "decoder",
             batch_size: int = 8, device: str = "cpu", force: bool = False, quiet: bool = True, budget: int = 40,
             seed: int = 0, options: LossOptions = LossOptions(), tokenizer: str | Path | None = None,
             threads: Threads = "auto", output: str = "model") -> CocktailResult:
    """Run an LM-Cocktail recipe; with ``out_dir`` also write the merged model.

    Args:
        out_dir: where to write the merged model (None: compute weights only).
        finetuned: M_t, the model fine-tuned on the target task.
        base: M_b, the model everything was fine-tuned from.
        peers: models fine-tuned on other tasks.
        examples: few-shot examples of the target task, or a dict task -> examples (unified).
        recipe: one of RECIPES, or "auto" (full / mono / no_finetune / unified from the inputs).
        alpha: weight of M_t in [0, 1].
        temperature: τ of Eq. 2 (> 0).
        model_type: "decoder" or "encoder".
        budget, seed: evaluations and seed of the black-box optimizer.
        options: how the few-shot loss is computed (``LossOptions``), for Eq. 2 and black-box alike.
        tokenizer: a directory whose tokenizer every model uses instead of its own.
        threads: torch CPU threads for the few-shot losses, a number or "auto" (``mergelab.threads``).
        output: "model" (a merged checkpoint) or "adapter": when the models are PEFT adapters of
            one base (and that base), the cocktail of their ΔWs as one adapter
            (``mergelab.adapters.cocktail``).

    Example:
        >>> cocktail("out", finetuned="ft", base="base", peers=["p1"], examples=five)  # doctest: +SKIP
    """
    recipe, candidates, examples = check_cocktail(finetuned=finetuned, base=base, peers=peers, examples=examples,
                                                  recipe=recipe, alpha=alpha, temperature=temperature,
                                                  model_type=model_type, options=options, tokenizer=tokenizer,
                                                  batch_size=batch_size, device=device, threads=threads)
    if output not in ("model", "adapter"):
        raise MergelabError(f"output must be 'model' or 'adapter', got {output!r}")
    if output == "adapter":
        from mergelab.adapters.cocktail import check_cocktail_adapter

        check_cocktail_adapter(finetuned if recipe != "no_finetune" else None, candidates)
    if out_dir is not None:  # before computing any loss
        check_output_dir(out_dir, force, inputs=[m for m in (finetuned, *candidates) if m is not None])
    losses = None
    if recipe == "mono":
        weights = [1.0]
    elif recipe == "blackbox":
        weights, _ = blackbox_weights(candidates, examples, model_type, finetuned=finetuned, alpha=alpha,
                                      budget=budget, seed=seed, options=options, batch_size=batch_size,
                                      device=device, tokenizer=tokenizer, threads=threads)
    else:
        losses = fewshot_losses(candidates, examples, model_type, options=options, batch_size=batch_size,
                                device=device, tokenizer=tokenizer, threads=threads)
        weights = softmax_weights(losses, temperature)
    uses_finetuned = finetuned is not None and recipe != "no_finetune"
    result = CocktailResult(recipe, str(finetuned) if uses_finetuned else None, candidates, weights, losses,
                            alpha if uses_finetuned else None)
    if out_dir is not None:
        from mergelab import merge

        if output == "adapter":
            from mergelab.adapters.cocktail import cocktail_adapter

            cocktail_adapter(result.finetuned, candidates, weights, result.alpha, out_dir, force=force)
        else:
            merge(cocktail_config(result), out_dir, force=force, quiet=quiet, device=device)
        result.out_dir = str(out_dir)
        (Path(out_dir) / "cocktail.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def check_cocktail(*, finetuned=None, base=None, peers: Sequence = (), examples=None, recipe: str = "auto",
                   alpha: float = 0.5, temperature: float = 5.0, model_type: str = "decoder",
                   options: LossOptions = LossOptions(), tokenizer=None, batch_size: int = 8,
                   device: str = "cpu", threads: Threads = "auto") -> tuple[str, list[str], list[dict] | None]:
    """Every check ``cocktail`` makes before loading a model: (recipe, candidates, pooled examples).

    Callers that create files (the α sweep) run it first, so bad input leaves nothing behind.
    """
    recipe = choose_recipe(finetuned, examples, recipe)
    check_run_settings(batch_size, device)
    check_threads(threads)
    if not 0.0 <= alpha <= 1.0:
        raise MergelabError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise MergelabError(f"temperature must be > 0, got {temperature}")
    candidates = [str(m) for m in ([base] if base is not None else []) + list(peers)]
    if recipe in ("full", "mono") and finetuned is None:
        raise MergelabError(f"recipe '{recipe}' needs the fine-tuned model (--finetuned)")
    if recipe == "mono":
        if base is None:
            raise MergelabError("recipe 'mono' merges the fine-tuned model with the base model; give --base")
        candidates = [str(base)]
    if not candidates:
        raise MergelabError(f"recipe '{recipe}' needs candidate models: a base model and/or peers")
    if recipe != "mono":
        if examples is None:
            raise MergelabError(f"recipe '{recipe}' computes weights from few-shot examples; give --examples")
        examples = pooled(examples)
        check_examples(examples, model_type, options.neg_number)
    _check_same_architecture([finetuned, *candidates] if finetuned is not None else candidates)
    if recipe != "mono":  # the models that will be loaded with transformers: check them before any compute
        for model in candidates + ([str(finetuned)] if recipe == "blackbox" and finetuned is not None else []):
            check_model_dir(model, tokenizer, what="candidate")
    return recipe, candidates, examples


def cocktail_config(result: CocktailResult) -> dict:
    """The engine config that realizes a recipe's decision."""
    from mergelab.vocab import union_if_vocabularies_differ

    # models that differ only by added tokens merge through the union vocabulary (the target's first)
    vocabulary = union_if_vocabularies_differ([m for m in (result.finetuned, *result.candidates) if m is not None])
    if result.finetuned is None:
        return {"merge_method": "linear",
                "models": [{"model": m, "parameters": {"weight": w}}
                           for m, w in zip(result.candidates, result.weights)], **vocabulary}
    return {"merge_method": "lm_cocktail", "parameters": {"alpha": result.alpha},
            "models": [{"model": result.finetuned}]
            + [{"model": m, "parameters": {"weight": w}} for m, w in zip(result.candidates, result.weights)],
            **vocabulary}


def _check_same_architecture(models: Sequence) -> None:
    """Different architectures (model_type in config.json) cannot be merged: say so early."""
    seen = {}
    for model in models:
        config = Path(model) / "config.json"
        if not Path(model).exists():
            raise MergelabError(f"model {model} does not exist")
        if config.is_file():
            kind = json.loads(config.read_text()).get("model_type")
            seen.setdefault(kind, str(model))
    if len(seen) > 1:
        described = ", ".join(f"{m} is {k}" for k, m in seen.items())
        raise MergelabError(f"the models have different architectures ({described}); LM-Cocktail merges one "
                            f"architecture")
