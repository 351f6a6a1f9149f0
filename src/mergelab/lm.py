"""Causal LMs on ``{"input", "output"}`` examples: the one encoding shared by training, scoring
and LM-Cocktail, the one training loop, and a tiny Llama with a word-level tokenizer for tests
and examples.

* ``encode``: ``<s> input output </s>`` with labels on the output and EOS only. The boundary
  between input and output is the scorer's (``mergelab.evaluate.decoder.split_encode``: encode
  ``input + " " + output`` whole and cut at the input's length), so a model is trained on
  exactly the tokens it is later scored on, also for byte-level BPE tokenizers, where encoding
  the output alone would give other ids;
* ``fit``: loss (+ penalty), backward, step, then ``after_step``; stops early when ``until``
  says the skill is learned (train to a criterion, with the steps as a bound);
* ``train``: ``fit`` with AdamW on seeded batches of examples;
* ``tiny_llama``, ``build_tokenizer``, ``make_examples``: a randomly initialised Llama-shape
  decoder, its word-level tokenizer, and three synthetic skills (copy, reverse, sort a list
  of digits) to learn.

Example:
    >>> model, tokenizer = tiny_llama(), build_tokenizer()  # doctest: +SKIP
    >>> train(model, tokenizer, make_examples("copy", 4000, seed=0), steps=3000, lr=1e-3, batch_size=64,
    ...       until=learned(tokenizer, make_examples("copy", 100, seed=1), share=0.98))  # doctest: +SKIP
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch

from mergelab.evaluate.decoder import split_encode_many

Example = dict[str, str]

DIGITS = [str(d) for d in range(10)]
SKILLS: dict[str, Callable[[list[str]], list[str]]] = {
    "copy": lambda xs: list(xs),
    "reverse": lambda xs: list(reversed(xs)),
    "sort": lambda xs: sorted(xs),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = SPECIALS + DIGITS + list(SKILLS) + ["="]


# -- the tiny model --------------------------------------------------------------------------
def build_tokenizer(words: list[str] | None = None):
    """A word-level tokenizer over ``words`` (default: the skills' vocabulary), as a
    ``PreTrainedTokenizerFast`` that adds BOS like Llama's; the first four words must be
    <pad> <s> </s> <unk>."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({word: i for i, word in enumerate(words or WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    # like Llama's tokenizer: encoding adds BOS unless add_special_tokens=False
    core.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int = len(WORDS), hidden: int = 64, layers: int = 2, heads: int = 4,
               intermediate: int = 128, tie: bool = True, seed: int = 0):
    """A randomly initialised Llama-shape causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=64,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_examples(skill: str, count: int, seed: int, length: tuple[int, int] = (3, 6)) -> list[Example]:
    """``{"input": "sort 3 1 2 =", "output": "1 2 3"}`` examples of one skill."""
    rng = random.Random(f"{skill}:{seed}")
    examples = []
    for _ in range(count):
        digits = [rng.choice(DIGITS) for _ in range(rng.randint(*length))]
        examples.append({"input": f"{skill} {' '.join(digits)} =", "output": " ".join(SKILLS[skill](digits))})
    return examples


# -- examples -> tokens ------------------------------------------------------------------------
def encode(tokenizer, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``<s> input output </s>`` with labels only on the output and EOS
    (-100 elsewhere), cut between input and output where the scorer cuts (``split_encode``)."""
    return Encoder(tokenizer)(examples)


class Encoder:
    """``encode`` that tokenizes each distinct (input, output) once, in batched calls, and keeps
    its ids: training draws the same examples again and again, and tokenizing them per step
    cost about a tenth of a small model's step. The batches are ``encode``'s, id for id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        keys = [(example["input"], example["output"]) for example in examples]
        missing = [key for key in dict.fromkeys(keys) if key not in self.ids]
        for key, (prompt, answer) in zip(missing, split_encode_many(self.tokenizer, missing)):
            self.ids[key] = (prompt, answer + [self.tokenizer.eos_token_id])
        pairs = [self.ids[key] for key in keys]
        width = max(len(prompt) + len(answer) for prompt, answer in pairs)
        input_ids, labels, attention_mask = [], [], []
        for prompt, answer in pairs:
            fill = width - len(prompt) - len(answer)
            input_ids.append(prompt + answer + [self.pad] * fill)
            labels.append([-100] * len(prompt) + answer + [-100] * fill)
            attention_mask.append([1] * (len(prompt) + len(answer)) + [0] * fill)
        return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
                "labels": torch.tensor(labels)}


@torch.no_grad()
def answer_accuracy(model, tokenizer, examples: Sequence[Example], batch_size: int = 64,
                    exact: bool = False) -> float:
    """Teacher-forced accuracy on the output tokens and EOS: the share of those tokens the model
    predicts, or with ``exact`` the share of examples whose every answer token it predicts
    (which is exactly when greedy decoding reproduces the answer)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in encode(tokenizer, examples[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]  # (B, L-1)
        counted = target != -100
        hits = (predicted == target) & counted
        if exact:
            correct += int((hits.sum(1) == counted.sum(1)).sum())
            total += len(target)
        else:
            correct += int(hits.sum())
            total += int(counted.sum())
    model.train(was_training)
    return correct / max(total, 1)


# -- training ----------------------------------------------------------------------------------
Until = Callable[[torch.nn.Module, int], bool]


def fit(model: torch.nn.Module, draw_batch: Callable[[], Any], steps: int, loss_fn: Callable[[torch.nn.Module, Any],
        torch.Tensor], optimizer: torch.optim.Optimizer, penalty: Callable[[], torch.Tensor] | None = None,
        after_step: Callable[[torch.nn.Module, int], Any] | None = None, until: Until | None = None,
        check_every: int = 25) -> int:
    """The one training loop: loss (+ penalty), backward, step, then ``after_step(model, step)``.

    Args:
        steps: the number of optimizer steps, or with ``until`` the most that may be taken.
        until: ``until(model, step) -> bool``, asked every ``check_every`` steps (model in eval
            mode, then back to train mode); training stops once it says True. Train to a
            criterion this way (e.g. ``learned(tokenizer, held_examples)``) so the result does
            not depend on how fast one machine's floating point gets there.

    Returns:
        the number of steps taken. The model is left in eval mode.
    """
    model.train()
    taken = 0
    for step in range(1, steps + 1):
        loss = loss_fn(model, draw_batch())
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, step)
        taken = step
        if until is not None and step % check_every == 0:
            model.eval()
            done = until(model, step)
            model.train()
            if done:
                break
    model.eval()
    return taken


def learned(tokenizer, held_examples: Sequence[Example], share: float = 1.0) -> Until:
    """A criterion for ``fit(until=...)``: at least ``share`` of ``held_examples`` answered
    exactly (every answer token right under teacher forcing, i.e. greedy decoding gets it)."""
    held = list(held_examples)
    return lambda model, step: answer_accuracy(model, tokenizer, held, exact=True) >= share


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token cross-entropy of a batch from ``encode`` (labels -100 are not counted)."""
    return model(**batch).loss


def train(model, tokenizer, examples: Sequence[Example], steps: int, lr: float = 3e-3, batch_size: int = 32,
          seed: int = 0, until: Until | None = None, check_every: int = 25) -> int:
    """AdamW on seeded batches of ``examples`` (in place), for ``steps`` steps or until ``until``
    says the skill is learned; returns the steps taken."""
    rng = random.Random(seed)
    examples = list(examples)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    encoder = Encoder(tokenizer)

    def draw():
        batch = encoder(rng.sample(examples, min(batch_size, len(examples))))
        return {key: value.to(device) for key, value in batch.items()}

    return fit(model, draw, steps, causal_lm_loss, optimizer, until=until, check_every=check_every)


@torch.no_grad()
def answer_loss(model, tokenizer, examples: Sequence[Example]) -> float:
    """Mean token cross-entropy of the answers (output + EOS) given the inputs."""
    model.eval()
    batch = {k: v.to(next(model.parameters()).device) for k, v in encode(tokenizer, examples).items()}
    return float(model(**batch).loss)
