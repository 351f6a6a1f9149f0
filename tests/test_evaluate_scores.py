"""Tasks files, text metrics, normalized performance and continual metrics on hand-made tables."""

from __future__ import annotations

import pytest

from mergelab import MergelabError
from mergelab.evaluate import (
    aggregate_seeds,
    average_accuracy,
    backward_transfer,
    continual_summary,
    forgetting,
    load_tasks,
    make_task,
    normalized_performance,
)
from mergelab.evaluate.metrics import exact_match, rouge_l, token_f1


def test_text_metrics_hand_computed():
    assert exact_match("The Cat.", "cat") == 1.0
    assert token_f1("the big red cat", "a red cat sat") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS 3 of 4 and 4


TASKS = [
    {"name": "qa1", "category": "qa", "split": "held_in"},
    {"name": "qa2", "category": "qa", "split": "held_in"},
    {"name": "sum", "category": "summary", "split": "held_in"},
    {"name": "nli", "category": "nli", "split": "held_out"},
    {"name": "lm", "category": "lm", "split": "held_out", "metric": "loss"},
]


def test_normalized_performance_means_within_then_across_categories():
    scores = {"qa1": 0.4, "qa2": 0.6, "sum": 0.3, "nli": 0.5, "lm": 2.0}
    experts = {"qa1": 0.8, "qa2": 0.6, "sum": 0.6}
    base = {"nli": 0.25, "lm": 4.0, "qa1": 0.1}
    result = normalized_performance(scores, TASKS, experts, base)
    assert result["tasks"]["qa1"]["normalized"] == pytest.approx(0.5)
    assert result["categories"]["held_in"] == pytest.approx({"qa": 0.75, "summary": 0.5})
    assert result["splits"]["held_in"] == pytest.approx(0.625)  # not (0.5 + 1 + 0.5) / 3
    assert result["tasks"]["lm"]["normalized"] == pytest.approx(2.0)  # loss: base / model
    assert result["splits"]["held_out"] == pytest.approx((2.0 + 2.0) / 2)
    assert result["problems"] == []


def test_missing_or_zero_references_are_reported_not_divided():
    scores = {"qa1": 0.4, "qa2": 0.6, "sum": 0.3, "nli": 0.5, "lm": 2.0}
    result = normalized_performance(scores, TASKS, {"qa1": 0.0, "qa2": 0.6}, {"nli": 0.5})
    assert result["tasks"]["qa1"]["normalized"] is None
    assert any("qa1" in p and "0" in p for p in result["problems"])
    assert any("'sum'" in p and "no expert" in p for p in result["problems"])
    assert any("'lm'" in p and "base model" in p for p in result["problems"])
    assert result["splits"] == {"held_in": pytest.approx(1.0), "held_out": pytest.approx(1.0)}


def test_seeds_are_averaged_last():
    runs = [{"splits": {"held_in": 0.5, "held_out": 1.0}}, {"splits": {"held_in": 0.7, "held_out": 0.9}}]
    summary = aggregate_seeds(runs)
    assert summary["held_in"]["mean"] == pytest.approx(0.6) and summary["held_in"]["seeds"] == 2


def test_continual_metrics_hand_computed():
    matrix = [[0.9, 0.1, 0.0],
              [0.7, 0.8, 0.2],
              [0.6, 0.5, 0.9]]
    assert average_accuracy(matrix) == pytest.approx(2.0 / 3)
    assert forgetting(matrix) == pytest.approx([0.3, 0.3])
    assert backward_transfer(matrix) == pytest.approx(-0.3)
    summary = continual_summary(matrix)
    assert summary["average_forgetting"] == pytest.approx(0.3)
    with pytest.raises(MergelabError, match="square"):
        forgetting([[1.0, 2.0]])
    with pytest.raises(MergelabError, match="empty"):
        average_accuracy([])


MC = {"input": "q", "options": ["a", "b"], "answer": 0}


@pytest.mark.parametrize("raw,match", [
    ({"name": "t", "kind": "rank_classification", "metric": "bleu", "examples": [MC]}, "unknown metric 'bleu'"),
    ({"name": "t", "kind": "dance", "examples": [MC]}, "unknown kind"),
    ({"name": "t", "kind": "rank_classification", "examples": []}, "no examples"),
    ({"name": "t", "kind": "rank_classification", "examples": [{"input": "q", "answer": 0}]}, "missing 'options'"),
    ({"name": "t", "kind": "rank_classification", "examples": [{"input": "q", "options": [], "answer": 0}]},
     "non-empty"),
    ({"name": "t", "kind": "rank_classification", "examples": [{**MC, "answer": "c"}]}, "neither an index"),
    ({"name": "t", "kind": "generation", "examples": [{"input": "q"}]}, "needs 'input' and 'output'"),
    ({"name": "t", "kind": "retrieval", "corpus": {"d1": "x"}, "queries": {"q1": "y"},
      "qrels": {"q1": {"d9": 1}}}, "document 'd9'"),
    ({"name": "t", "kind": "retrieval", "metric": "ndcg", "corpus": {"d1": "x"}, "queries": {"q1": "y"},
      "qrels": {"q1": {"d1": 1}}}, "ndcg@10"),
    ({"kind": "loss", "examples": [{"text": "x"}]}, "name"),
    ({"name": "t", "kind": "loss", "examples": [{"text": "x"}], "colour": "red"}, "colour"),
])
def test_bad_tasks_are_refused_before_evaluation(raw, match):
    with pytest.raises(MergelabError, match=match):
        make_task(raw)


def test_tasks_file_with_relative_data_and_duplicate_names(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"input": "q", "options": ["a", "b"], "answer": "b"}\n')
    (tmp_path / "t.yml").write_text("tasks:\n  - {name: a, kind: rank_classification, data: d.jsonl}\n")
    assert load_tasks(tmp_path / "t.yml")[0].examples[0]["answer"] == "b"
    (tmp_path / "t2.yml").write_text("- {name: a, kind: loss, examples: [{text: x}]}\n"
                                     "- {name: a, kind: loss, examples: [{text: y}]}\n")
    with pytest.raises(MergelabError, match="unique"):
        load_tasks(tmp_path / "t2.yml")
    with pytest.raises(MergelabError, match="does not exist"):
        load_tasks(tmp_path / "missing.yml")
