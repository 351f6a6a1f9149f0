"""`mergelab demo`: tiny checkpoints built locally, merged with every method, loaded back with
transformers and scored on every skill."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from mergelab.demo.tiny import TASKS, build_checkpoints, encode, make_examples


def demo_configs(paths: dict[str, Path], fisher_paths: dict[str, Path]) -> dict[str, dict]:
    """One mergekit-style config per method over the demo checkpoints."""
    experts = [str(paths[task]) for task in TASKS]
    base = str(paths["base"])
    every = [{"model": e} for e in experts]
    return {
        "linear": {"merge_method": "linear", "models": every},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": every,
                            "parameters": {"lambda": 0.6}},
        "ties": {"merge_method": "ties", "base_model": base, "models": every,
                 "parameters": {"density": 0.5, "lambda": 1.0}},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base, "models": every,
                        "parameters": {"density": 0.5, "lambda": 0.6}},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": every,
                      "parameters": {"density": 0.5, "lambda": 1.0}},
        "slerp": {"merge_method": "slerp", "base_model": experts[0], "models": [{"model": experts[1]}],
                  "parameters": {"t": 0.5}},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": every},
        "fisher": {"merge_method": "fisher",
                   "models": [{"model": e, "parameters": {"fisher": str(fisher_paths[t])}}
                              for t, e in zip(TASKS, experts)]},
        "lm_cocktail": {"merge_method": "lm_cocktail", "models": [{"model": experts[0]}, {"model": base},
                                                                   *every[1:]],
                        "parameters": {"alpha": 0.5}},
    }


@torch.no_grad()
def score(model_dir: Path, test_sets: dict[str, list[dict[str, str]]]) -> dict[str, float]:
    """Answer-token accuracy per skill for a model directory, loaded with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = {}
    for task, examples in test_sets.items():
        batch = encode(tokenizer, examples)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted = logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        counted = target != -100
        scores[task] = float(((predicted == target) & counted).sum() / counted.sum())
    return scores


def run_demo(out: str | Path = "mergelab-demo", quiet: bool = False, seed: int = 0) -> dict:
    """Build (or reuse) the tiny checkpoints, merge with every method, score, print a table.

    Returns the summary written to ``OUT/summary.json``.
    """
    from mergelab import merge
    from mergelab.fisher import estimate_fisher

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per loaded tiny model is noise here
    out = Path(out)
    log = (lambda *_: None) if quiet else print
    started = time.perf_counter()
    models = out / "models"
    names = ["base", *TASKS]
    log(f"mergelab demo: tiny Llama-shape checkpoints in {models}")
    if all((models / ("base" if n == "base" else f"expert-{n}") / "config.json").is_file() for n in names):
        paths = {n: models / ("base" if n == "base" else f"expert-{n}") for n in names}
        log("  reusing the checkpoints built earlier")
    else:
        paths = build_checkpoints(models, seed=seed, log=log)

    fisher_paths = {}
    for task in TASKS:
        texts = [f"{e['input']} {e['output']}" for e in make_examples(task, 64, seed + 7)]
        fisher_paths[task] = estimate_fisher(paths[task], texts, out / "fisher" / f"{task}.safetensors", force=True)

    test_sets = {task: make_examples(task, 200, seed + 99) for task in TASKS}
    rows = [{"model": name, "merge_seconds": None, **score(paths[name], test_sets)} for name in names]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for method, config in demo_configs(paths, fisher_paths).items():
        config_path = out / "configs" / f"{method}.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        tick = time.perf_counter()
        merged = merge(config_path, out / "merged" / method, force=True, quiet=True, seed=seed)
        rows.append({"model": method, "merge_seconds": time.perf_counter() - tick, **score(merged, test_sets)})
        log(f"  merged with {method}")

    for row in rows:
        row["mean"] = sum(row[t] for t in TASKS) / len(TASKS)
    log("")
    log(format_table(rows))
    log(f"\n(answer-token accuracy on 200 held-out examples per skill; configs in {out / 'configs'}, "
        f"merged models in {out / 'merged'}; {time.perf_counter() - started:.0f} s in all)")
    summary = {"rows": rows, "tasks": list(TASKS)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(rows: list[dict]) -> str:
    header = f"{'model':16} {'merge s':>8} " + " ".join(f"{t:>8}" for t in TASKS) + f" {'mean':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        seconds = f"{row['merge_seconds']:.2f}" if row["merge_seconds"] is not None else "-"
        cells = " ".join(f"{row[t]:8.1%}" for t in TASKS)
        lines.append(f"{row['model']:16} {seconds:>8} {cells} {row['mean']:8.1%}")
    return "\n".join(lines)
