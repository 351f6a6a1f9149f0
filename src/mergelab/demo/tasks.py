"""The demo world's tasks: small, learnable, and genuinely different skills over one word
vocabulary, grouped in T0-like categories. Held-in tasks get an expert each; held-out tasks
only the base model has seen (as its "general" training).

Every task yields examples in the evaluation harness's format: rank classification
``{"input", "options", "answer"}`` or generation ``{"input", "output"}``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

DIGITS = [str(d) for d in range(10)]
KEYS = list("abcdefgh")
POSITIVE = ["good", "great", "nice", "happy", "fine"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]
FILLER = ["the", "food", "film", "service", "was", "and", "very"]
LABELS = ["positive", "negative", "even", "odd", "yes", "no"]
COMMANDS = ["copy", "reverse", "add", "sub", "review", "parity", "lookup", "count", "sort", "max", "has", "next",
            "in", ";", "=", "?"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCABULARY = SPECIALS + DIGITS + KEYS + POSITIVE + NEGATIVE + FILLER + LABELS + COMMANDS

Example = dict
Generator = Callable[[random.Random], Example]


def _digits(rng: random.Random, low: int = 2, high: int = 4) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(rng.randint(low, high))]


def _choice(rng: random.Random, prompt: str, answer: str, pool: list[str], k: int = 4) -> Example:
    """A rank-classification item: the answer among k−1 distinct distractors from ``pool``."""
    distractors = rng.sample([p for p in pool if p != answer], min(k - 1, len(set(pool)) - 1))
    options = distractors + [answer]
    rng.shuffle(options)
    return {"input": prompt, "options": options, "answer": options.index(answer)}


def copy(rng):
    xs = _digits(rng)
    return {"input": f"copy {' '.join(xs)} =", "output": " ".join(xs)}


def reverse(rng):
    xs = _digits(rng)
    return {"input": f"reverse {' '.join(xs)} =", "output": " ".join(reversed(xs))}


def sort(rng):
    xs = _digits(rng)
    return {"input": f"sort {' '.join(xs)} =", "output": " ".join(sorted(xs))}


def add(rng):
    a, b = rng.randrange(10), rng.randrange(10)
    return _choice(rng, f"add {a} {b} =", str((a + b) % 10), DIGITS)


def sub(rng):
    a, b = rng.randrange(10), rng.randrange(10)
    return _choice(rng, f"sub {a} {b} =", str((a - b) % 10), DIGITS)


def review(rng):
    positive = rng.random() < 0.5
    major, minor = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
    words = [rng.choice(major) for _ in range(rng.randint(2, 3))] + [rng.choice(minor) for _ in range(rng.randint(0, 1))]
    words += [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
    rng.shuffle(words)
    return _choice(rng, f"review {' '.join(words)} ?", "positive" if positive else "negative",
                   ["positive", "negative"], k=2)


def parity(rng):
    bits = [rng.choice("01") for _ in range(rng.randint(2, 4))]
    return _choice(rng, f"parity {' '.join(bits)} ?", "odd" if bits.count("1") % 2 else "even", ["even", "odd"], k=2)


def lookup(rng):
    keys = rng.sample(KEYS, 3)
    values = [rng.choice(DIGITS) for _ in keys]
    asked = rng.randrange(3)
    pairs = " ".join(f"{k} {v}" for k, v in zip(keys, values))
    return _choice(rng, f"lookup {pairs} ; {keys[asked]} ?", values[asked], DIGITS)


def count(rng):
    target = rng.choice(DIGITS[:4])
    xs = [rng.choice(DIGITS[:4]) for _ in range(rng.randint(3, 5))]
    return _choice(rng, f"count {target} in {' '.join(xs)} ?", str(xs.count(target)), DIGITS[:6])


def maximum(rng):
    xs = rng.sample(DIGITS, rng.randint(3, 4))
    return _choice(rng, f"max {' '.join(xs)} ?", max(xs), xs)


def member(rng):
    xs = _digits(rng, 3, 4)
    asked = rng.choice(xs) if rng.random() < 0.5 else rng.choice(DIGITS)
    return _choice(rng, f"has {asked} in {' '.join(xs)} ?", "yes" if asked in xs else "no", ["yes", "no"], k=2)


def successor(rng):
    a = rng.randrange(10)
    return _choice(rng, f"next {a} =", str((a + 1) % 10), DIGITS)


@dataclass(frozen=True)
class WorldTask:
    name: str
    category: str
    split: str  # held_in / held_out (WORLD_TASKS) or instruction (INSTRUCTION_TASKS)
    kind: str  # rank_classification / generation
    make: Generator

    @property
    def metric(self) -> str:
        return "exact_match" if self.kind == "generation" else "accuracy"


WORLD_TASKS = [
    WorldTask("copy", "sequence", "held_in", "generation", copy),
    WorldTask("reverse", "sequence", "held_in", "generation", reverse),
    WorldTask("add", "arithmetic", "held_in", "rank_classification", add),
    WorldTask("sub", "arithmetic", "held_in", "rank_classification", sub),
    WorldTask("review", "classification", "held_in", "rank_classification", review),
    WorldTask("parity", "classification", "held_in", "rank_classification", parity),
    WorldTask("lookup", "memory", "held_in", "rank_classification", lookup),
    WorldTask("count", "memory", "held_in", "rank_classification", count),
    WorldTask("sort", "ordering", "held_out", "generation", sort),
    WorldTask("max", "comparison", "held_out", "rank_classification", maximum),
    WorldTask("has", "membership", "held_out", "rank_classification", member),
    WorldTask("next", "counting", "held_out", "rank_classification", successor),
]


# -- instruction tasks (the FLAN analogue of the scale study's `instruction` base kind) ---------
# Seven more skills over the same vocabulary, each introduced by its own instruction word. They
# are neither held-in nor held-out: only an `instruction` base is trained on them.


def first(rng):
    xs = _digits(rng)
    return {"input": f"the {' '.join(xs)} =", "output": xs[0]}


def last(rng):
    xs = _digits(rng)
    return {"input": f"and {' '.join(xs)} =", "output": xs[-1]}


def length(rng):
    xs = _digits(rng, 1, 5)
    return _choice(rng, f"service {' '.join(xs)} ?", str(len(xs)), DIGITS[1:7])


def letter_at(rng):
    index = rng.randrange(len(KEYS))
    return _choice(rng, f"film {index} =", KEYS[index], KEYS)


def key_of(rng):
    keys = rng.sample(KEYS, 3)
    values = rng.sample(DIGITS, 3)
    asked = rng.randrange(3)
    pairs = " ".join(f"{k} {v}" for k, v in zip(keys, values))
    return _choice(rng, f"food {pairs} ; {values[asked]} ?", keys[asked], keys, k=3)


def polarity(rng):
    word = rng.choice(POSITIVE + NEGATIVE)
    return _choice(rng, f"very {word} ?", "positive" if word in POSITIVE else "negative", ["positive", "negative"],
                   k=2)


def digit_parity(rng):
    digit = rng.randrange(10)
    return _choice(rng, f"was {digit} ?", "odd" if digit % 2 else "even", ["even", "odd"], k=2)


INSTRUCTION_TASKS = [
    WorldTask("first", "instruction", "instruction", "generation", first),
    WorldTask("last", "instruction", "instruction", "generation", last),
    WorldTask("length", "instruction", "instruction", "rank_classification", length),
    WorldTask("letter", "instruction", "instruction", "rank_classification", letter_at),
    WorldTask("key", "instruction", "instruction", "rank_classification", key_of),
    WorldTask("polarity", "instruction", "instruction", "rank_classification", polarity),
    WorldTask("digit_parity", "instruction", "instruction", "rank_classification", digit_parity),
]


def make_split(task: WorldTask, split: str, count: int, seed: int) -> list[Example]:
    """Examples of one split; splits use disjoint random streams (train/validation/test)."""
    rng = random.Random(f"{task.name}:{split}:{seed}")
    return [task.make(rng) for _ in range(count)]


def as_training_pair(example: Example) -> dict[str, str]:
    """The (input, output) a model is trained on: the right option for classification items."""
    if "options" in example:
        return {"input": example["input"], "output": example["options"][example["answer"]]}
    return {"input": example["input"], "output": example["output"]}
