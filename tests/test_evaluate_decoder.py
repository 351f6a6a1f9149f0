"""Decoder evaluators against independent computations and a model whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.lm import build_tokenizer, make_examples, tiny_llama
from mergelab.evaluate import evaluate_model, load_tasks, make_task
from mergelab.evaluate.decoder import example_losses, generate, rank_choices


def logprob_alone(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation | context) from one unpadded forward pass."""
    context_ids = tokenizer(context)["input_ids"]
    ids = tokenizer(context + " " + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids)))


ITEMS = [
    {"input": "copy 1 2 =", "options": ["1 2", "2 1", "1 2 3 4 5 6"], "answer": 0},
    {"input": "sort 9 8 7 6 5 =", "options": ["5 6 7 8 9", "9"], "answer": "5 6 7 8 9"},
    {"input": "reverse 3 =", "options": ["3", "4", "3 3", "5 5 5 5"], "answer": 0},
]


def test_batched_option_scores_equal_unbatched_forward_passes():
    model, tokenizer = tiny_llama(seed=4).eval(), build_tokenizer()
    scores = rank_choices(model, tokenizer, ITEMS, batch_size=4)
    for item, item_scores in zip(ITEMS, scores):
        for option, score in zip(item["options"], item_scores):
            assert score == pytest.approx(logprob_alone(model, tokenizer, item["input"], option), abs=1e-4)


def test_length_normalized_scores_are_per_token_means():
    model, tokenizer = tiny_llama(seed=4).eval(), build_tokenizer()
    total = rank_choices(model, tokenizer, ITEMS[:1])[0]
    mean = rank_choices(model, tokenizer, ITEMS[:1], length_normalize=True)[0]
    lengths = [2, 2, 6]
    assert mean == pytest.approx([t / n for t, n in zip(total, lengths)], abs=1e-5)


def test_padding_side_and_missing_pad_token_do_not_change_scores():
    model = tiny_llama(seed=4).eval()
    plain = build_tokenizer()
    odd = build_tokenizer()
    odd.padding_side = "left"
    odd.pad_token = None
    expected = rank_choices(model, plain, ITEMS, batch_size=3)
    got = rank_choices(model, odd, ITEMS, batch_size=5)
    for got_item, expected_item in zip(got, expected):
        assert got_item == pytest.approx(expected_item, abs=1e-4)


def test_losses_equal_the_mean_token_cross_entropy_of_each_answer():
    model, tokenizer = tiny_llama(seed=5).eval(), build_tokenizer()
    examples = make_examples("sort", 5, seed=1)
    losses = example_losses(model, tokenizer, examples, batch_size=2)
    for example, (loss, count) in zip(examples, losses):
        ids = tokenizer(example["input"] + " " + example["output"])["input_ids"] + [tokenizer.eos_token_id]
        start = len(tokenizer(example["input"])["input_ids"])
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = -sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))) / (len(ids) - start)
        assert count == len(ids) - start
        assert loss == pytest.approx(expected, abs=1e-4)


def test_a_model_trained_to_copy_ranks_the_copy_first(copy_model):
    model, tokenizer, _ = copy_model
    examples = make_examples("copy", 60, seed=11, length=(2, 4))
    def shifted(text):  # same length, every digit different: only knowing the skill separates them
        return " ".join(str((int(d) + 1) % 10) for d in text.split())

    items = [{"input": e["input"], "options": [shifted(e["output"]), e["output"]], "answer": 1} for e in examples]
    task = make_task({"name": "copy-mc", "kind": "rank_classification", "examples": items})
    untrained_model = tiny_llama(seed=9).eval()
    for candidate in (model, untrained_model):  # accuracy = how often the copy out-scores the shift
        wins = [logprob_alone(candidate, tokenizer, i["input"], i["options"][1])
                > logprob_alone(candidate, tokenizer, i["input"], i["options"][0]) for i in items]
        assert evaluate_model(candidate, tokenizer, [task])["copy-mc"] == pytest.approx(sum(wins) / len(wins))
    # Any training on the copy skill beats a random model; how far depends on the machine's training run.
    assert evaluate_model(model, tokenizer, [task])["copy-mc"] > evaluate_model(untrained_model, tokenizer, [task])[
        "copy-mc"]


def greedy_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding of one unpadded prompt, one forward pass per token."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_batched_greedy_generation_equals_one_prompt_at_a_time_and_scores_exact_match(copy_model):
    """Left-padded batches of prompts of different lengths decode exactly as each prompt alone;
    exact match counts those outputs. Nothing here depends on how well the model was trained."""
    model, tokenizer, _ = copy_model
    examples = make_examples("copy", 30, seed=12, length=(2, 4))
    outputs = generate(model, tokenizer, [e["input"] for e in examples], max_new_tokens=6, batch_size=7)
    assert outputs == [greedy_alone(model, tokenizer, e["input"], 6) for e in examples]
    hits = sum(o == e["output"] for o, e in zip(outputs, examples))
    task = make_task({"name": "copy-gen", "kind": "generation", "metric": "exact_match", "examples": examples,
                      "options": {"max_new_tokens": 6, "stop": []}})
    assert evaluate_model(model, tokenizer, [task])["copy-gen"] == pytest.approx(hits / len(examples))


def test_loss_and_perplexity_tasks(copy_model):
    model, tokenizer, _ = copy_model
    examples = make_examples("copy", 10, seed=13)
    losses = example_losses(model, tokenizer, examples)
    tasks = [make_task({"name": "l", "kind": "loss", "examples": examples}),
             make_task({"name": "p", "kind": "loss", "metric": "perplexity", "examples": examples})]
    scores = evaluate_model(model, tokenizer, tasks)
    assert scores["l"] == pytest.approx(sum(l for l, _ in losses) / len(losses))
    token_mean = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    assert scores["p"] == pytest.approx(math.exp(token_mean), rel=1e-5)


def test_text_examples_score_every_token_after_the_first():
    model, tokenizer = tiny_llama(seed=6).eval(), build_tokenizer()
    [(loss, count)] = example_losses(model, tokenizer, [{"text": "copy 1 2 = 1 2"}])
    assert count == 7  # 6 words + EOS after BOS


def test_eval_cli_writes_csv_and_json(copy_model, tmp_path):
    import csv
    import json

    from click.testing import CliRunner

    from mergelab.cli import main

    _, _, directory = copy_model
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in ITEMS))
    (tmp_path / "tasks.yml").write_text(
        "tasks:\n  - {name: mc, kind: rank_classification, category: qa, split: held_in, data: mc.jsonl}\n"
        "  - name: gen\n    kind: generation\n    metric: token_f1\n"
        "    examples: [{input: 'copy 1 2 =', output: '1 2'}]\n")
    for name in ("r.csv", "r.json"):
        result = CliRunner().invoke(main, ["eval", str(directory), str(directory), "--tasks",
                                           str(tmp_path / "tasks.yml"), "--out", str(tmp_path / name), "--quiet"])
        assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 4 and rows[0]["task"] == "mc" and rows[0]["split"] == "held_in"
    assert json.loads((tmp_path / "r.json").read_text())[1]["metric"] == "token_f1"
    assert load_tasks(tmp_path / "tasks.yml")[0].size == 3


def test_tokenizer_that_does_not_fit_the_model_is_refused():
    from mergelab import MergelabError

    model = tiny_llama(vocab_size=8)
    with pytest.raises(MergelabError, match="does not belong"):
        evaluate_model(model, build_tokenizer(), [make_task({"name": "x", "kind": "loss",
                                                              "examples": [{"text": "copy 1"}]})])


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_shared_context_cache_path_equals_full_sequences(architecture):
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergelab.evaluate.decoder import continuation_logprobs, shared_context_logprobs, split_encode

    tokenizer = build_tokenizer()
    if architecture == "gpt2":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                           n_positions=64)).eval()
    else:
        model = tiny_llama(seed=8).eval()
    groups = [[split_encode(tokenizer, item["input"], option) for option in item["options"]] for item in ITEMS]
    fast = shared_context_logprobs(model, groups, pad_id=0, batch_size=5)
    slow = continuation_logprobs(model, groups, pad_id=0, batch_size=5)
    for fast_item, slow_item in zip(fast, slow):
        assert [c for _, c in fast_item] == [c for _, c in slow_item]
        assert [t for t, _ in fast_item] == pytest.approx([t for t, _ in slow_item], abs=1e-4)


class NoCacheLM(torch.nn.Module):
    """A causal LM whose forward takes only ids and a mask: no key/value cache, no position ids."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_scoring_path_follows_the_model_s_capability():
    from mergelab.evaluate.decoder import shares_context

    model = tiny_llama(seed=8).eval()
    assert shares_context(model)
    assert not shares_context(NoCacheLM(model))


def test_both_scoring_paths_give_the_same_option_scores():
    model, tokenizer = tiny_llama(seed=8).eval(), build_tokenizer()
    shared = rank_choices(model, tokenizer, ITEMS, batch_size=4, share_context=True)
    full = rank_choices(model, tokenizer, ITEMS, batch_size=4, share_context=False)
    without_cache = rank_choices(NoCacheLM(model), tokenizer, ITEMS, batch_size=4)  # chosen by capability
    for shared_item, full_item, plain_item in zip(shared, full, without_cache):
        assert shared_item == pytest.approx(full_item, abs=1e-4)
        assert plain_item == full_item


def test_pad_helper_pads_on_the_requested_side():
    from mergelab.evaluate.decoder import pad

    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_is_the_same_for_any_batch_size_and_repeated_prompts():
    model, tokenizer = tiny_llama(seed=4).eval(), build_tokenizer()
    prompts = ["copy 1 2 =", "reverse 3 4 5 =", "copy 1 2 =", "sort 9 8 ="]
    alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == alone
