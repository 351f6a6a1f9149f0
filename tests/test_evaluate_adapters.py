"""lm-evaluation-harness and MTEB adapters, run offline on local data and checked against our own
evaluators on the same items."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergelab.cli import main
from mergelab.lm import make_examples
from mergelab.errors import MergelabError
from mergelab.evaluate import evaluate_model, evaluate_models, make_task
from mergelab.evaluate.adapters import ingest_mteb_results, run_lm_eval, run_mteb
from mergelab.evaluate.runner import RESULT_FIELDS

pytest.importorskip("lm_eval")
pytest.importorskip("mteb")

CORPUS = {
    "d1": "The cat sat on the warm windowsill and purred.",
    "d2": "Stock markets fell sharply after the interest rate decision.",
    "d3": "Bake the bread at 220 degrees for thirty minutes.",
    "d4": "The striker scored twice in the second half of the final.",
    "d5": "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "d6": "The new phone has a larger battery and a brighter screen.",
    "d7": "Dogs love long walks in the park.",
    "d8": "The central bank kept rates unchanged this quarter.",
}
QUERIES = {"q1": "kitten resting by the window", "q2": "central bank raises rates and shares drop",
           "q3": "how long to bake a loaf", "q4": "football match goals", "q5": "how plants make food from light",
           "q6": "pets and outdoor exercise", "q7": "interest rates"}
# graded and deliberately imperfect (q7's relevant document is not the obvious one): scores below 1
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 2, "d8": 1}, "q3": {"d3": 1}, "q4": {"d4": 1}, "q5": {"d5": 1},
         "q6": {"d7": 1, "d1": 1}, "q7": {"d6": 1}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub access, also for modules that read the switches when first imported."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def shifted(digits: str) -> str:
    return " ".join(str((int(d) + 1) % 10) for d in digits.split())


def copy_choice_items(count: int, seed: int) -> list[dict]:
    """The copy model prefers the copy over the shifted list by many nats (no near ties). Half the
    items name the shifted list as the answer, so accuracy is ~0.5 and two equal accuracies mean
    equal rankings rather than two ceilings; answers are option strings, as our tasks allow."""
    examples = make_examples("copy", count, seed=seed, length=(2, 4))
    return [{"input": e["input"], "options": [shifted(e["output"]), e["output"]],
             "answer": e["output"] if i % 2 else shifted(e["output"])} for i, e in enumerate(examples)]


def copy_generation_items(count: int, seed: int) -> list[dict]:
    """Half the references are the copy (which the copy model, trained until it copies, gets
    right), half the shifted list (which it never generates): exact match is ~0.5 however well
    the model trained, so equal scores compare real decisions rather than two floors or ceilings."""
    examples = make_examples("copy", count, seed=seed, length=(2, 4))
    return [{"input": e["input"], "output": e["output"] if i % 2 else shifted(e["output"])}
            for i, e in enumerate(examples)]


def scores_of(rows) -> dict[str, float]:
    return {row["task"]: row["score"] for row in rows}


def test_lm_eval_scores_equal_our_evaluators_on_the_same_items(copy_model):
    _, _, directory = copy_model
    choice = make_task({"name": "copy mc", "kind": "rank_classification", "category": "skills", "split": "held_in",
                        "examples": copy_choice_items(12, seed=21)})
    generation = make_task({"name": "copy-gen", "kind": "generation", "metric": "exact_match",
                            "examples": copy_generation_items(12, seed=23), "options": {"max_new_tokens": 8}})
    rows = run_lm_eval(directory, [choice, generation], batch_size=4)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    ours = evaluate_model(model, tokenizer, [choice, generation])
    assert 0.2 < ours["copy mc"] < 0.8 and 0.2 < ours["copy-gen"] < 0.8
    assert scores_of(rows) == pytest.approx(ours)
    assert [(r["metric"], r["kind"], r["n"]) for r in rows] == [("acc", "lm_eval", 12), ("exact_match", "lm_eval", 12)]
    assert all(tuple(r) == RESULT_FIELDS for r in rows)
    assert (rows[0]["category"], rows[0]["split"], rows[1]["split"]) == ("skills", "held_in", "held_out")


def write_user_lm_eval_task(folder, items) -> None:
    """A task of the user's own, in lm-eval's YAML with its own field names and a Jinja prompt."""
    data = folder / "copy_choice.jsonl"
    data.write_text("".join(json.dumps({"question": i["input"], "choices": i["options"],
                                        "label": i["options"].index(i["answer"])}) + "\n" for i in items))
    (folder / "copy_choice.yaml").write_text(
        "task: my_copy_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")


def test_lm_eval_task_names_from_an_include_path(copy_model, tmp_path):
    _, _, directory = copy_model
    items = copy_choice_items(8, seed=23)
    write_user_lm_eval_task(tmp_path, items)
    [row] = run_lm_eval(directory, ["my_copy_choice"], include_path=tmp_path, batch_size=4, limit=6)
    task = make_task({"name": "same", "kind": "rank_classification", "examples": items[:6]})
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert row["score"] == pytest.approx(evaluate_model(model, tokenizer, [task])["same"])
    assert (row["task"], row["category"], row["split"], row["metric"], row["n"]) == \
        ("my_copy_choice", "lm_eval", "held_out", "acc", 6)


def test_cli_routes_tasks_through_lm_eval_and_adds_named_tasks(copy_model, tmp_path):
    _, _, directory = copy_model
    (tmp_path / "user").mkdir()
    write_user_lm_eval_task(tmp_path / "user", copy_choice_items(4, seed=24))
    (tmp_path / "tasks.yml").write_text(json.dumps({"tasks": [
        {"name": "mc", "kind": "rank_classification", "examples": copy_choice_items(4, seed=25)}]}))
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(main, ["eval", str(directory), "--tasks", str(tmp_path / "tasks.yml"),
                                       "--backend", "lm-eval", "--lm-eval", "my_copy_choice", "--lm-eval-include",
                                       str(tmp_path / "user"), "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [(r["task"], r["kind"]) for r in json.loads(out.read_text())] == \
        [("mc", "lm_eval"), ("my_copy_choice", "lm_eval")]

    nothing = CliRunner().invoke(main, ["eval", str(directory)])
    assert nothing.exit_code == 2 and "--tasks" in nothing.output and "--lm-eval" in nothing.output


@pytest.mark.parametrize("raw, fragment", [
    ({"kind": "loss", "examples": [{"text": "copy 1"}]}, "kind loss"),
    ({"kind": "generation", "metric": "token_f1", "examples": [{"input": "copy 1 =", "output": "1"}]},
     "metric token_f1"),
    ({"kind": "retrieval", "corpus": CORPUS, "queries": QUERIES, "qrels": QRELS}, "--backend mteb"),
])
def test_lm_eval_refuses_what_it_cannot_convert(tmp_path, raw, fragment):
    with pytest.raises(MergelabError, match=fragment):
        run_lm_eval(tmp_path, [make_task({"name": "t", **raw})])


def test_missing_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    monkeypatch.setitem(sys.modules, "mteb", None)
    with pytest.raises(MergelabError, match=r"mergelab\[harness\]"):
        run_lm_eval(tmp_path, ["anything"])
    with pytest.raises(MergelabError, match=r"mergelab\[harness\]"):
        run_mteb(tmp_path, ["anything"])


def test_mteb_on_a_local_retrieval_task_agrees_with_our_evaluator(minilm_dir):
    tasks = [make_task({"name": f"ir {metric}", "kind": "retrieval", "metric": metric, "corpus": CORPUS,
                        "queries": QUERIES, "qrels": QRELS, "category": "retrieval"})
             for metric in ("ndcg@10", "mrr@10", "recall@2")]
    rows = run_mteb(minilm_dir, tasks, batch_size=4)
    ours = scores_of(evaluate_models([minilm_dir], tasks, progress=False))  # mean pooling, from 1_Pooling
    assert all(score < 0.95 for score in ours.values())
    assert scores_of(rows) == pytest.approx(ours, abs=1e-4)  # MTEB rounds most scores to 5 decimals
    assert [(r["metric"], r["kind"], r["category"], r["n"]) for r in rows] == \
        [("ndcg@10", "mteb", "retrieval", 7), ("mrr@10", "mteb", "retrieval", 7), ("recall@2", "mteb", "retrieval", 7)]


def test_cli_routes_retrieval_tasks_through_mteb(minilm_dir, tmp_path):
    task = {"name": "ir", "kind": "retrieval", "metric": "mrr@10", "corpus": CORPUS, "queries": QUERIES, "qrels": QRELS}
    (tmp_path / "tasks.yml").write_text(json.dumps({"tasks": [task]}))
    result = CliRunner().invoke(main, ["eval", str(minilm_dir), "--tasks", str(tmp_path / "tasks.yml"),
                                       "--backend", "mteb", "--out", str(tmp_path / "rows.csv")])
    assert result.exit_code == 0, result.output
    assert "ir" in result.output and "mrr@10" in result.output and (tmp_path / "rows.csv").is_file()


def test_mteb_task_names_need_the_hub(minilm_dir):
    with pytest.raises(MergelabError, match="does not know"):
        run_mteb(minilm_dir, ["NoSuchMtebTask"])
    with pytest.raises(MergelabError, match="Hugging Face Hub"):  # offline: SciFact's data cannot be fetched
        run_mteb(minilm_dir, ["SciFact"])
    with pytest.raises(MergelabError, match="retrieval tasks only"):
        run_mteb(minilm_dir, [make_task({"name": "l", "kind": "loss", "examples": [{"text": "a b"}]})])


def test_ingest_mteb_result_files(tmp_path):
    run = tmp_path / "results" / "org__merged" / "no_revision_available"
    run.mkdir(parents=True)
    (run / "model_meta.json").write_text(json.dumps({"name": "org/merged", "revision": None}))
    (run / "SciFact.json").write_text(json.dumps({
        "dataset_revision": "abc", "task_name": "SciFact", "mteb_version": "2.0.0", "evaluation_time": 3.0,
        "scores": {"test": [{"hf_subset": "default", "languages": ["eng-Latn"], "main_score": 0.6,
                             "ndcg_at_10": 0.6, "mrr_at_10": 0.55, "recall_at_5": 0.7, "nauc_ndcg_at_10_max": 0.1}],
                   "dev": [{"hf_subset": "fra", "languages": ["fra-Latn"], "main_score": 0.5, "ndcg_at_10": 0.5}]}}))
    rows = ingest_mteb_results(tmp_path / "results")
    assert [(r["model"], r["task"], r["metric"], r["score"]) for r in rows] == [
        ("org/merged", "SciFact", "ndcg@10", 0.6), ("org/merged", "SciFact", "mrr@10", 0.55),
        ("org/merged", "SciFact", "recall@5", 0.7), ("org/merged", "SciFact/dev/fra", "ndcg@10", 0.5)]
    assert all(tuple(r) == RESULT_FIELDS and r["kind"] == "mteb" and r["higher_is_better"] for r in rows)
    assert ingest_mteb_results(run / "SciFact.json", model="m")[0]["model"] == "m"

    (run / "notes.json").write_text("[1, 2]")
    with pytest.raises(MergelabError, match="notes.json is not an MTEB result"):
        ingest_mteb_results(tmp_path / "results")


@pytest.mark.slow
def test_lm_eval_builtin_task_names_need_the_hub(copy_model):
    """lm-eval's own tasks download their data: offline they fail with a clear error (indexing
    lm-eval's ~15k task YAMLs takes several seconds, hence slow)."""
    _, _, directory = copy_model
    with pytest.raises(MergelabError, match="did you mean"):
        run_lm_eval(directory, ["arc_easyy"])
    with pytest.raises(MergelabError, match="Hugging Face Hub"):
        run_lm_eval(directory, ["arc_easy"], limit=2)
