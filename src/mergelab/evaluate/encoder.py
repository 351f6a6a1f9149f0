"""Embedding models: pooled, normalized embeddings and retrieval scoring."""

from __future__ import annotations

from typing import Sequence

import torch

from mergelab.errors import MergelabError


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) token states -> (B, H): the first token ("cls", as BGE) or the masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    raise MergelabError(f"pooling '{pooling}' is not known; use 'cls' or 'mean'")


def embed(model, tokenizer, texts: Sequence[str], *, pooling: str = "cls", batch_size: int = 32,
          max_length: int = 512, normalize: bool = True, device=None) -> torch.Tensor:
    """(len(texts), H) embeddings from a transformers encoder (``AutoModel``), L2-normalized."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        vectors = pool(hidden, batch["attention_mask"], pooling).float()
        chunks.append(torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors)
    return torch.cat(chunks)


@torch.no_grad()
def rank_corpus(model, tokenizer, queries: dict[str, str], corpus: dict[str, str], *, top_k: int = 100,
                pooling: str = "cls", batch_size: int = 32, max_length: int = 512, device=None
                ) -> dict[str, list[str]]:
    """For each query id, the corpus ids ranked by cosine similarity (best first)."""
    query_ids, doc_ids = list(queries), list(corpus)
    options = dict(pooling=pooling, batch_size=batch_size, max_length=max_length, device=device)
    query_vectors = embed(model, tokenizer, [queries[q] for q in query_ids], **options)  # (Q, H)
    doc_vectors = embed(model, tokenizer, [corpus[d] for d in doc_ids], **options)  # (D, H)
    similarity = query_vectors @ doc_vectors.T  # (Q, D)
    best = similarity.topk(min(top_k, len(doc_ids)), dim=1).indices
    return {q: [doc_ids[j] for j in best[i].tolist()] for i, q in enumerate(query_ids)}
