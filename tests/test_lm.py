"""The library's LM pieces: training encodes examples exactly as scoring does (also for a
byte-level BPE tokenizer), and the one training loop stops at a criterion."""

from __future__ import annotations

import pytest
import torch

from mergelab.evaluate.decoder import example_losses, split_encode
from mergelab.lm import build_tokenizer, encode, fit, make_examples, tiny_llama

EXAMPLES = [{"input": "copy 1 2 =", "output": "1 2"}, {"input": "sort 9 3 =", "output": "3 9"},
            {"input": "reverse 4 =", "output": "4"}]


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE tokenizer (GPT-2 style: a space belongs to the next token), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [f"{e['input']} {e['output']}" for e in make_examples("copy", 200, seed=0)]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def one_pair(tokenizer, context: str, continuation: str, separator: str = " ") -> tuple[list[int], list[int]]:
    """The definition of split_encode, one tokenizer call per text: encode the whole and cut at the
    context's ids; where the whole does not start with them, encode the continuation alone."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + separator + continuation)["input_ids"]
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids):]
    return context_ids, tokenizer(separator + continuation, add_special_tokens=False)["input_ids"]


def labelled(batch: dict[str, torch.Tensor], row: int) -> list[int]:
    labels = batch["labels"][row]
    return labels[labels != -100].tolist()


def test_word_level_training_tokens_are_the_output_alone_as_before():
    tokenizer = build_tokenizer()
    batch = encode(tokenizer, EXAMPLES)
    for row, example in enumerate(EXAMPLES):
        prompt = tokenizer(example["input"])["input_ids"]
        answer = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert batch["input_ids"][row][: len(prompt) + len(answer)].tolist() == prompt + answer
        assert labelled(batch, row) == answer


def test_byte_level_bpe_trains_on_the_tokens_it_is_scored_on(byte_bpe):
    batch = encode(byte_bpe, EXAMPLES)
    for row, example in enumerate(EXAMPLES):
        context, continuation = split_encode(byte_bpe, example["input"], example["output"])
        assert labelled(batch, row) == continuation + [byte_bpe.eos_token_id]
        assert batch["input_ids"][row][: len(context)].tolist() == context
        # the output encoded on its own lacks the leading space: other ids, which training used to learn
        assert byte_bpe(example["output"], add_special_tokens=False)["input_ids"] != continuation


def test_training_loss_equals_the_scorers_few_shot_loss(byte_bpe):
    model = tiny_llama(vocab_size=len(byte_bpe), seed=3).eval()
    losses = example_losses(model, byte_bpe, EXAMPLES)
    with torch.no_grad():
        for example, (loss, count) in zip(EXAMPLES, losses):
            assert float(model(**encode(byte_bpe, [example])).loss) == pytest.approx(loss, rel=1e-5)
            assert count == len(labelled(encode(byte_bpe, [example]), 0))


def test_fit_stops_when_the_criterion_holds_and_takes_every_step_without_one():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    asked = []

    def until(m, step):
        asked.append((step, m.training))
        return step >= 6

    taken = fit(model, lambda: None, 100, lambda m, batch: m.weight.sum(), optimizer, until=until, check_every=3)
    assert taken == 6 and asked == [(3, False), (6, False)] and not model.training
    assert fit(model, lambda: None, 7, lambda m, batch: m.weight.sum(), optimizer) == 7


def test_batched_split_encoding_equals_one_pair_at_a_time(byte_bpe):
    from mergelab.evaluate.decoder import split_encode_many

    # "cop" + "y" with no separator is one word: the whole does not start with the context's ids,
    # so the continuation is encoded on its own (the fallback branch), batched like the rest
    items = [(e["input"], e["output"]) for e in EXAMPLES] + [("cop", "y"), ("copy 1 2 =", "1 2"), ("cop", "y")]
    for separator in (" ", ""):
        assert split_encode_many(byte_bpe, items, separator) == [split_encode(byte_bpe, c, x, separator)
                                                                 for c, x in items]
        assert [split_encode(byte_bpe, c, x, separator) for c, x in items] == [one_pair(byte_bpe, c, x, separator)
                                                                               for c, x in items]
    context, whole = byte_bpe("cop")["input_ids"], byte_bpe("copy")["input_ids"]
    assert whole[: len(context)] != context
    assert split_encode_many(byte_bpe, []) == []


def test_the_training_encoder_keeps_each_examples_ids_and_gives_the_one_pair_at_a_time_batches(byte_bpe):
    from mergelab.lm import Encoder

    def one_at_a_time(tokenizer, examples):  # the definition: one_pair per example, EOS, right padding
        rows = []
        for example in examples:
            prompt, answer = one_pair(tokenizer, example["input"], example["output"])
            rows.append((prompt, answer + [tokenizer.eos_token_id]))
        width = max(len(p) + len(a) for p, a in rows)
        return {"input_ids": [p + a + [tokenizer.pad_token_id] * (width - len(p) - len(a)) for p, a in rows],
                "labels": [[-100] * len(p) + a + [-100] * (width - len(p) - len(a)) for p, a in rows],
                "attention_mask": [[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a)) for p, a in rows]}

    examples = make_examples("copy", 40, seed=3) + make_examples("sort", 40, seed=4) + [
        {"input": "cop", "output": "y"}]  # a boundary the whole string tokenizes differently
    for tokenizer in (byte_bpe, build_tokenizer()):
        encoder, drawn = Encoder(tokenizer), set()
        for draw in (examples[:7], examples[5:60], examples[::-3], examples[:7], [examples[-1]] * 3):
            drawn |= {(e["input"], e["output"]) for e in draw}
            expected = one_at_a_time(tokenizer, draw)
            for batch in (encoder(draw), encode(tokenizer, draw)):
                assert {k: v.tolist() for k, v in batch.items()} == expected
        assert len(encoder.ids) == len(drawn)  # each distinct pair tokenized once, then kept
