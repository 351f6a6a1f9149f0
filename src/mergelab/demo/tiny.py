"""Tiny but real checkpoints: a word-level tokenizer saved as a ``transformers`` tokenizer,
Llama-shape decoders trained with plain PyTorch on three different sequence skills, saved
as ordinary Hugging Face model directories (one of them sharded).

The skills are deliberately different (copy, reverse, sort a list of digits), so each
expert's task vector points somewhere else and merging has something to trade off.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch

DIGITS = [str(d) for d in range(10)]
TASKS: dict[str, Callable[[list[str]], list[str]]] = {
    "copy": lambda xs: list(xs),
    "reverse": lambda xs: list(reversed(xs)),
    "sort": lambda xs: sorted(xs),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = SPECIALS + DIGITS + list(TASKS) + ["="]


def build_tokenizer(words: list[str] | None = None):
    """A word-level tokenizer over ``words`` (default: this module's vocabulary), as a
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


def make_examples(task: str, count: int, seed: int, length: tuple[int, int] = (3, 6)) -> list[dict[str, str]]:
    """``{"input": "sort 3 1 2 =", "output": "1 2 3"}`` examples of one skill."""
    rng = random.Random(f"{task}:{seed}")
    examples = []
    for _ in range(count):
        digits = [rng.choice(DIGITS) for _ in range(rng.randint(*length))]
        examples.append({"input": f"{task} {' '.join(digits)} =", "output": " ".join(TASKS[task](digits))})
    return examples


def encode(tokenizer, examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Batch of ``<s> input output </s>`` with labels only on the output and EOS (-100 elsewhere)."""
    rows, label_rows = [], []
    for example in examples:
        prompt = tokenizer(example["input"])["input_ids"]  # starts with BOS
        answer = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train(model, tokenizer, examples: list[dict[str, str]], steps: int, lr: float = 3e-3, batch_size: int = 32,
          seed: int = 0) -> None:
    """A few AdamW steps on ``examples`` (in place)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = encode(tokenizer, rng.sample(examples, min(batch_size, len(examples))))
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def answer_loss(model, tokenizer, examples: list[dict[str, str]]) -> float:
    """Mean token cross-entropy of the answers (output + EOS) given the inputs."""
    model.eval()
    return float(model(**encode(tokenizer, examples)).loss)


def save(model, tokenizer, directory: Path, max_shard_size: str | None = None) -> Path:
    """Save as an ordinary HF model directory (safetensors, config, tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    tokenizer.save_pretrained(directory)
    return directory


def build_checkpoints(root: Path, seed: int = 0, base_steps: int = 60, expert_steps: int = 80,
                      log: Callable[[str], None] = print) -> dict[str, Path]:
    """A base trained briefly on all three skills, and one expert per skill fine-tuned from it.

    Returns ``{"base": path, "copy": path, "reverse": path, "sort": path}``; the "sort"
    expert is saved in several shards to exercise sharded reading.
    """
    import copy

    tokenizer = build_tokenizer()
    base = tiny_llama(seed=seed)
    mixture = [e for task in TASKS for e in make_examples(task, 200, seed)]
    train(base, tokenizer, mixture, base_steps, seed=seed)
    paths = {"base": save(base, tokenizer, root / "base")}
    log(f"  base trained ({base_steps} steps on a mixture of {', '.join(TASKS)})")
    for index, task in enumerate(TASKS):
        expert = copy.deepcopy(base)
        train(expert, tokenizer, make_examples(task, 400, seed + 1), expert_steps, seed=seed + index + 1)
        shard = "40KB" if task == "sort" else None
        paths[task] = save(expert, tokenizer, root / f"expert-{task}", max_shard_size=shard)
        log(f"  expert '{task}' fine-tuned ({expert_steps} steps)")
    return paths

