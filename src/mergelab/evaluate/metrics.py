"""Scores of one prediction against its references, and of one ranking against its qrels."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache


def normalize_text(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_text(prediction).split(), normalize_text(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Google's rouge-score package)."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


TEXT_METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def best_over_references(metric: str, prediction: str, references: list[str]) -> float:
    return max(TEXT_METRICS[metric](prediction, reference) for reference in references)


def ndcg_at_k(ranking: list[str], relevance: dict[str, float], k: int) -> float:
    """NDCG@k with linear gain rel / log2(rank + 1), as trec_eval computes it."""
    dcg = sum(relevance.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(ranking[:k]))
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranking: list[str], relevance: dict[str, float], k: int) -> float:
    for rank, doc in enumerate(ranking[:k]):
        if relevance.get(doc, 0.0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def recall_at_k(ranking: list[str], relevance: dict[str, float], k: int) -> float:
    relevant = {doc for doc, r in relevance.items() if r > 0}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


RANKING_METRICS = {"ndcg": ndcg_at_k, "mrr": mrr_at_k, "recall": recall_at_k}
