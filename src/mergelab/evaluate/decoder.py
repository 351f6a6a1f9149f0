"""Scoring with causal LMs: log-likelihood of continuations (rank classification, losses)
and greedy generation. Batches are padded to their longest sequence, never to a fixed length,
and padding is built here (right for scoring, left for generation), whatever the tokenizer's
own ``padding_side`` says.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from mergelab.errors import MergelabError

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def ensure_pad_token(tokenizer) -> int:
    """The pad id, falling back to EOS for tokenizers without one (GPT-2, Llama)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise MergelabError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def split_encode(tokenizer, context: str, continuation: str, separator: str = " ") -> Pair:
    """Token ids of ``context`` and of ``separator + continuation`` as the model sees them together.

    Encoding the whole string and cutting at the context's length keeps the tokenization of
    the boundary natural for BPE/SentencePiece; when the whole does not start with the
    context's ids, the continuation is encoded on its own.
    """
    return split_encode_many(tokenizer, [(context, continuation)], separator)[0]


def split_encode_many(tokenizer, items: Sequence[tuple[str, str]], separator: str = " ") -> list[Pair]:
    """``split_encode`` of every (context, continuation) in ``items``, the same ids, in a few
    batched tokenizer calls: each distinct text is encoded once (the options of one item share
    its context), where one call per text cost more than the small models' forward passes."""
    texts = {text: None for context, continuation in items for text in (context, context + separator + continuation)}
    ids = _encode_texts(tokenizer, list(texts))
    pairs, alone = [], []
    for context, continuation in items:
        context_ids, whole = ids[context], ids[context + separator + continuation]
        if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
            pairs.append((context_ids, whole[len(context_ids):]))
        else:
            pairs.append((context_ids, None))
            alone.append(separator + continuation)
    if alone:  # a boundary the whole string tokenizes differently: the continuation on its own
        alone_ids = _encode_texts(tokenizer, list(dict.fromkeys(alone)), add_special_tokens=False)
        pairs = [(c, x if x is not None else alone_ids[separator + continuation])
                 for (c, x), (_, continuation) in zip(pairs, items)]
    return pairs


def _encode_texts(tokenizer, texts: list[str], **options) -> dict[str, list[int]]:
    """``{text: input ids}`` from one batched call (a fast tokenizer encodes the batch natively;
    the masks it would return too cost five times the encoding)."""
    if not texts:
        return {}
    encoded = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, **options)
    return dict(zip(texts, encoded["input_ids"]))


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), both (len(rows), longest row), padded on ``side`` with ``pad_id``."""
    width = max(len(row) for row in rows)
    fill = [[pad_id] * (width - len(row)) for row in rows]
    marks = [[0] * (width - len(row)) for row in rows]
    if side == "left":
        ids = [pad + list(row) for pad, row in zip(fill, rows)]
        mask = [zeros + [1] * len(row) for zeros, row in zip(marks, rows)]
    else:
        ids = [list(row) + pad for pad, row in zip(fill, rows)]
        mask = [[1] * len(row) + zeros for zeros, row in zip(marks, rows)]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def shares_context(model) -> bool:
    """Whether ``model``'s forward takes a key/value cache and position ids, so that the options
    of a multiple-choice item can share one run of their context (``shared_context_logprobs``)."""
    parameters = inspect.signature(model.forward).parameters
    return "position_ids" in parameters and ("cache" in parameters or "past_key_values" in parameters)


def _device(model, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(model, groups: Sequence[Sequence[Pair]], *, pad_id: int, batch_size: int = 16,
                          max_length: int = 2048, device=None) -> list[list[tuple[float, int]]]:
    """Σ log p(continuation | context) and the continuation's length, for every pair.

    ``groups`` are scored whole within one batch (the options of one multiple-choice item);
    groups are sorted by length so padding stays small. Contexts are cut from the left when
    a sequence exceeds ``max_length``; continuations are never cut.
    """
    device = _device(model, device)
    results: list[list[tuple[float, int]]] = [[] for _ in groups]
    order = sorted(range(len(groups)), key=lambda g: -max(len(c) + len(x) for c, x in groups[g]))
    batch: list[int] = []
    for g in order + [None]:
        if g is not None and (not batch or sum(len(groups[i]) for i in batch) + len(groups[g]) <= batch_size):
            batch.append(g)
            continue
        pairs = [pair for i in batch for pair in groups[i]]
        scores = iter(_score_pairs(model, pairs, pad_id, max_length, device))
        for i in batch:
            results[i] = [next(scores) for _ in groups[i]]
        batch = [g] if g is not None else []
    return results


def _scoring_forward(model) -> tuple[dict, bool]:
    """(keyword arguments, takes logits_to_keep) of a scoring forward pass of ``model``: no
    key/value cache where the forward would otherwise fill one for nothing."""
    parameters = inspect.signature(model.forward).parameters
    return ({"use_cache": False} if "use_cache" in parameters else {}), "logits_to_keep" in parameters


def _score_pairs(model, pairs: list[Pair], pad_id: int, max_length: int, device) -> list[tuple[float, int]]:
    rows, starts = [], []
    for context, continuation in pairs:
        ids = (context + continuation)[-max_length:]
        rows.append(ids)
        starts.append(max(len(ids) - len(continuation), 1))  # first continuation position
    input_ids, attention = pad(rows, pad_id, "right")
    scored = torch.zeros((len(rows), input_ids.shape[1] - 1), dtype=torch.bool)  # over the shifted targets
    for r, (ids, start) in enumerate(zip(rows, starts)):
        scored[r, start - 1 : len(ids) - 1] = True
    targets = input_ids[:, 1:][scored]  # (K,)
    input_ids, attention, scored, targets = (t.to(device) for t in (input_ids, attention, scored, targets))
    options, keeps_logits = _scoring_forward(model)
    if keeps_logits:
        # The vocabulary projection only at the positions some row scores (their union over the
        # batch): for few-shot losses the answer is a fraction of the sequence, and the
        # projection a fifth of a small model's work.
        keep = scored.any(0).nonzero().squeeze(1)  # (U,) positions, ascending
        logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, **options).logits
        full = logits.shape[1] == input_ids.shape[1] != keep.numel()  # a model that takes it but ignores it
        picked = logits[:, :-1][scored] if full else logits[scored[:, keep]]  # (K, V), in scored's order
    else:
        logits = model(input_ids=input_ids, attention_mask=attention, **options).logits  # (B, L, V)
        picked = logits[:, :-1][scored]  # (K, V): only the scored positions
    picked = picked.float().log_softmax(-1)
    token_logprobs = picked.gather(1, targets.unsqueeze(1)).squeeze(1)  # (K,)
    row_of = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(scored)[scored]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, token_logprobs.double())
    counts = scored.sum(1)
    return [(float(s), int(c)) for s, c in zip(sums.cpu(), counts.cpu())]


def rank_choices(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 16, max_length: int = 2048,
                 length_normalize: bool = False, separator: str = " ", device=None,
                 share_context: bool | None = None) -> list[list[float]]:
    """Per example, the score of each option: Σ log p(option | input), or its per-token mean.

    The input is run once per example and its key/value cache shared by the options
    (about k× less work for k options than scoring k full sequences); models whose forward
    does not take a cache and position ids are scored one full sequence per option. Both
    give the same scores; ``share_context`` forces one or the other (None: ``shares_context``).
    """
    pad_id = ensure_pad_token(tokenizer)
    encoded = iter(split_encode_many(tokenizer, [(example["input"], str(option)) for example in examples
                                                 for option in example["options"]], separator))
    groups = []
    for number, example in enumerate(examples):
        pairs = [next(encoded) for _ in example["options"]]
        if any(not continuation for _, continuation in pairs):
            raise MergelabError(f"example {number}: an option encodes to no tokens; options must be non-empty text")
        groups.append(pairs)
    if share_context is None:
        share_context = shares_context(model)
    score = shared_context_logprobs if share_context else continuation_logprobs
    scored = score(model, groups, pad_id=pad_id, batch_size=batch_size, max_length=max_length, device=device)
    return [[total / count if length_normalize else total for total, count in item] for item in scored]


@torch.no_grad()
def shared_context_logprobs(model, groups: Sequence[Sequence[Pair]], *, pad_id: int, batch_size: int = 16,
                            max_length: int = 2048, device=None) -> list[list[tuple[float, int]]]:
    """Like ``continuation_logprobs`` for groups whose pairs share one context: the contexts
    (left-padded) run once, their cache is repeated per continuation, and the continuations
    (right-padded) run on top of it with explicit position ids."""
    device = _device(model, device)
    results: list[list[tuple[float, int]]] = [[] for _ in groups]
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0][0]))
    start = 0
    while start < len(order):
        batch, rows = [], 0
        while start < len(order) and (not batch or rows + len(groups[order[start]]) <= batch_size):
            batch.append(order[start])
            rows += len(groups[order[start]])
            start += 1
        for g, scores in zip(batch, _score_shared(model, [groups[g] for g in batch], pad_id, max_length, device)):
            results[g] = scores
    return results


def _score_shared(model, groups, pad_id: int, max_length: int, device) -> list[list[tuple[float, int]]]:
    longest_option = max(len(c) for group in groups for _, c in group)
    contexts = [group[0][0][-max(max_length - longest_option, 1):] for group in groups]
    context_ids, context_mask = pad(contexts, pad_id, "left")
    context_ids, context_mask = context_ids.to(device), context_mask.to(device)
    positions = (context_mask.cumsum(-1) - 1).clamp_min(0)
    first = model(input_ids=context_ids, attention_mask=context_mask, position_ids=positions, use_cache=True,
                  logits_to_keep=1)
    last_logprobs = first.logits[:, -1].float().log_softmax(-1)  # (G, V): predicts each option's first token

    owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)  # (R,)
    options = [c for group in groups for _, c in group]
    option_ids, option_mask = pad(options, pad_id, "right")
    option_width = option_ids.shape[1]
    option_ids, option_mask = option_ids.to(device), option_mask.to(device)
    cache = getattr(first, "cache", None) or first.past_key_values
    cache.batch_select_indices(owner)  # (R, ...) per layer: each option gets its context's cache
    lengths = context_mask.sum(1)[owner]  # (R,)
    # transformers >= 5 renames past_key_values to cache
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    second = model(input_ids=option_ids, attention_mask=torch.cat([context_mask[owner], option_mask], 1),
                   position_ids=lengths.unsqueeze(1) + torch.arange(option_width, device=device),
                   use_cache=False, **{cache_arg: cache})
    totals = last_logprobs[owner].gather(1, option_ids[:, :1]).squeeze(1).double()  # first token, (R,)
    if option_width > 1:
        scored = option_mask[:, 1:].bool()  # targets 1..: predicted by the option's own logits
        picked = second.logits[:, :-1][scored].float().log_softmax(-1)  # (K, V)
        token_logprobs = picked.gather(1, option_ids[:, 1:][scored].unsqueeze(1)).squeeze(1)
        row_of = torch.arange(len(options), device=device).unsqueeze(1).expand_as(scored)[scored]
        totals = totals.index_add(0, row_of, token_logprobs.double())
    counts = option_mask.sum(1)
    flat = [(float(t), int(c)) for t, c in zip(totals.cpu(), counts.cpu())]
    out, position = [], 0
    for group in groups:
        out.append(flat[position : position + len(group)])
        position += len(group)
    return out


def example_losses(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 8, max_length: int = 2048,
                   add_eos: bool = True, device=None) -> list[tuple[float, int]]:
    """Per example, (mean token cross-entropy, number of tokens).

    ``{"input", "output"}``: the sequence is ``input + " " + output`` (+ EOS) and only the
    output tokens and EOS count (LM-Cocktail's few-shot loss). ``{"text"}``: every token after
    the first counts.
    """
    pad_id = ensure_pad_token(tokenizer)
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    groups = []
    for example in examples:
        if "text" in example:
            ids = tokenizer(example["text"])["input_ids"] + eos
            if len(ids) < 2:
                raise MergelabError(f"example {example!r} is too short to have a loss")
            groups.append([(ids[:1], ids[1:])])
        else:
            context, continuation = split_encode(tokenizer, example["input"], example["output"])
            groups.append([(context, continuation + eos)])
    scored = continuation_logprobs(model, groups, pad_id=pad_id, batch_size=batch_size, max_length=max_length,
                                   device=device)
    return [(-total / count, count) for [(total, count)] in scored]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16,
             stop: Sequence[str] = (), device=None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at the first stop string."""
    device = _device(model, device)
    pad_id = ensure_pad_token(tokenizer)
    encoded = _encode_texts(tokenizer, list(dict.fromkeys(prompts)))  # one batched call
    encoded = [encoded[p] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention = pad([encoded[i] for i in index], pad_id, "left")
        width = input_ids.shape[1]
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(generated[:, width:].tolist(), skip_special_tokens=True)
        for i, text in zip(index, texts):
            for marker in stop:
                text = text.split(marker)[0]
            outputs[i] = text.strip()
    return outputs
