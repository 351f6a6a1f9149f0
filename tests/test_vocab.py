"""Vocabularies: merging models whose tokenizers differ by added tokens or by padding.

The models share a byte-level BPE vocabulary trained here on generated text; experts add
different special tokens (one token at different ids in two of them), and one pads its
embedding to a multiple of 64. Rows are checked by hand against the aligned inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergelab
from mergelab.engine import plan_merge
from mergelab.config import MergeOptions, load_config
from mergelab.errors import MergelabError
from mergelab.lm import tiny_llama

WORDS = ["cat", "dog", "sat", "ran", "on", "the", "mat", "log", "and", "then", "slept", "barked", "quickly",
         "over", "under", "jumped", "fox", "lazy", "brown", "bird", "sang", "sweetly", "while", "we", "walked"]


def base_tokenizer():
    """A byte-level BPE of about 120 tokens, trained on generated sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>"],
                                                         initial_alphabet=[]))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def expert(base_model, tokenizer, added: list[str], seed: int, rows: int | None = None):
    """A copy of ``base_model`` (moved by seeded noise) whose tokenizer adds ``added`` special
    tokens, its embedding grown to match (or to ``rows``)."""
    from copy import deepcopy

    from tokenizers import AddedToken

    tokenizer = deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    model = deepcopy(base_model)
    model.resize_token_embeddings(rows or len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model, tokenizer


@pytest.fixture(scope="module")
def vocab_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_world")
    tokenizer = base_tokenizer()
    base = tiny_llama(vocab_size=len(tokenizer), tie=False, seed=0)
    paths = {"base": save(base, tokenizer, root / "base")}
    paths["chat"] = save(*expert(base, tokenizer, ["<|im_start|>", "<|im_end|>"], seed=1), root / "chat")
    paths["tool"] = save(*expert(base, tokenizer, ["<|im_end|>", "<tool>"], seed=2), root / "tool")
    paths["padded"] = save(*expert(base, tokenizer, [], seed=3, rows=128), root / "padded")
    # the base model itself plus two new tokens, its shared rows unchanged: for the behaviour check
    same, same_tok = expert(base, tokenizer, ["<|im_start|>", "<|im_end|>"], seed=4)
    with torch.no_grad():
        for param, original in zip(same.parameters(), base.parameters()):
            param[: original.shape[0]] = original  # every tensor, and the first 120 rows of the embeddings
    paths["same"] = save(same, same_tok, root / "same")
    return {key: str(value) for key, value in paths.items()}


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def ids(directory) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(directory).get_vocab()


def linear(*models, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in models],
            **extra}


@pytest.fixture(scope="module")
def union_merge(vocab_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("union") / "out"
    config = linear((vocab_world["chat"], 1.0), (vocab_world["tool"], 3.0), tokenizer_source="union")
    return mergelab.merge(config, out, quiet=True)


def test_a_union_merge_loads_and_tokenizes_every_added_token_to_one_id(union_merge, vocab_world):
    tokenizer = AutoTokenizer.from_pretrained(union_merge)
    model = AutoModelForCausalLM.from_pretrained(union_merge)
    assert len(tokenizer) == 123  # 120 shared + <|im_start|>, <|im_end|> (chat) + <tool> (tool)
    config = json.loads((union_merge / "config.json").read_text())
    assert config["vocab_size"] == 123 == model.get_input_embeddings().weight.shape[0]
    for token in ("<|im_start|>", "<|im_end|>", "<tool>"):
        encoded = tokenizer(f"the cat {token} sat", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in encoded
        assert encoded.count(tokenizer.convert_tokens_to_ids(token)) == 1
    special_map = json.loads((union_merge / "special_tokens_map.json").read_text())
    assert {"<|im_start|>", "<|im_end|>", "<tool>"} <= set(special_map["additional_special_tokens"])
    generated = model.generate(**tokenizer("the cat", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 2


def test_union_rows_are_the_method_over_the_models_that_have_each_token(union_merge, vocab_world):
    chat, tool, merged = weights(vocab_world["chat"]), weights(vocab_world["tool"]), weights(union_merge)
    chat_ids, tool_ids, out_ids = ids(vocab_world["chat"]), ids(vocab_world["tool"]), ids(union_merge)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        # a shared token: (1·chat + 3·tool) / 4, the linear merge of the aligned rows
        row = out_ids["Ġcat"] if "Ġcat" in out_ids else out_ids["cat"]
        expected = (chat[name][row] + 3 * tool[name][row]) / 4
        torch.testing.assert_close(merged[name][row], expected)
        # <|im_end|> is id 121 in chat but 120 in tool: aligned by string
        expected = (chat[name][chat_ids["<|im_end|>"]] + 3 * tool[name][tool_ids["<|im_end|>"]]) / 4
        torch.testing.assert_close(merged[name][out_ids["<|im_end|>"]], expected)
        # tokens only one model has take its row (weights renormalized over that model)
        torch.testing.assert_close(merged[name][out_ids["<|im_start|>"]], chat[name][chat_ids["<|im_start|>"]])
        torch.testing.assert_close(merged[name][out_ids["<tool>"]], tool[name][tool_ids["<tool>"]])
    # every other tensor is the plain linear merge
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (chat[name] + 3 * tool[name]) / 4)


def test_the_fixture_puts_one_token_at_different_ids(vocab_world, union_merge):
    assert ids(vocab_world["chat"])["<|im_end|>"] == 121 and ids(vocab_world["tool"])["<|im_end|>"] == 120
    # the union: the base's 120 tokens, then chat's additions, then tool's new one
    out = ids(union_merge)
    assert (out["<|im_start|>"], out["<|im_end|>"], out["<tool>"]) == (120, 121, 122)


def test_a_union_merge_of_a_model_with_itself_plus_tokens_keeps_its_logits(vocab_world, tmp_path):
    config = linear((vocab_world["base"], 1.0), (vocab_world["same"], 1.0), tokenizer_source="union")
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    base = AutoModelForCausalLM.from_pretrained(vocab_world["base"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    text = AutoTokenizer.from_pretrained(out)("the dog ran on the log and then slept", return_tensors="pt")
    with torch.no_grad():
        expected = base(**text).logits
        got = merged(**text).logits[..., : expected.shape[-1]]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_base_using_method_takes_the_experts_rows_where_the_base_lacks_a_token(vocab_world, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": vocab_world["base"], "tokenizer_source": "union",
              "models": [{"model": vocab_world["chat"], "parameters": {"weight": 0.5}},
                         {"model": vocab_world["tool"], "parameters": {"weight": 0.5}}]}
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    base, chat, tool = (weights(vocab_world[k]) for k in ("base", "chat", "tool"))
    merged, out_ids, chat_ids = weights(out), ids(out), ids(vocab_world["chat"])
    name = "model.embed_tokens.weight"
    # a base token: base + 0.5·(chat − base) + 0.5·(tool − base)
    expected = base[name][5] + 0.5 * (chat[name][5] - base[name][5]) + 0.5 * (tool[name][5] - base[name][5])
    torch.testing.assert_close(merged[name][5], expected)
    # <|im_end|>: no base row, so the weighted mean of the experts that have it
    expected = (chat[name][chat_ids["<|im_end|>"]] + tool[name][ids(vocab_world["tool"])["<|im_end|>"]]) / 2
    torch.testing.assert_close(merged[name][out_ids["<|im_end|>"]], expected)
    torch.testing.assert_close(merged[name][out_ids["<|im_start|>"]], chat[name][chat_ids["<|im_start|>"]])


def test_different_vocabularies_without_a_tokenizer_source_are_refused_naming_the_tokens(vocab_world, tmp_path):
    config = linear((vocab_world["chat"], 1.0), (vocab_world["tool"], 1.0))
    config["models"][1]["model"] = vocab_world["base"]
    with pytest.raises(MergelabError, match=r"vocab size mismatch: tensor '.*' has 122 rows in model .* but 120 .*"
                                            r"alone has '<\|im_start\|>', '<\|im_end\|>'.*tokenizer_source: union"):
        mergelab.merge(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_padded_vocabulary_is_understood_and_reproduced(vocab_world, tmp_path):
    # the padded model as base: its 128 rows (8 past the last token) are kept, rows aligned by token
    config = linear((vocab_world["padded"], 1.0), (vocab_world["chat"], 1.0), tokenizer_source="base")
    out = mergelab.merge(config, tmp_path / "base", quiet=True)
    padded, chat, merged = weights(vocab_world["padded"]), weights(vocab_world["chat"]), weights(out)
    name = "lm_head.weight"
    assert merged[name].shape[0] == 128 == json.loads((out / "config.json").read_text())["vocab_size"]
    torch.testing.assert_close(merged[name][7], (padded[name][7] + chat[name][7]) / 2)
    torch.testing.assert_close(merged[name][125], padded[name][125])  # padding rows: the padded model's
    assert len(AutoTokenizer.from_pretrained(out)) == 120  # chat's added tokens are not in the base vocabulary
    AutoModelForCausalLM.from_pretrained(out)
    # union with explicit padding: 123 tokens rounded up to a multiple of 64
    config = linear((vocab_world["chat"], 1.0), (vocab_world["tool"], 1.0),
                    tokenizer={"source": "union", "pad_to_multiple_of": 64})
    out = mergelab.merge(config, tmp_path / "union64", quiet=True)
    assert weights(out)["model.embed_tokens.weight"].shape[0] == 128
    # a padded base without pad_to_multiple_of: its multiple (128 rows: 128) is reproduced
    config = linear((vocab_world["padded"], 1.0), (vocab_world["tool"], 1.0), tokenizer_source="union")
    out = mergelab.merge(config, tmp_path / "union", quiet=True)
    assert weights(out)["model.embed_tokens.weight"].shape[0] == 128 and len(AutoTokenizer.from_pretrained(out)) == 122


def test_per_token_sources_and_a_forced_new_token(vocab_world, tmp_path):
    config = linear((vocab_world["base"], 1.0), (vocab_world["chat"], 1.0), (vocab_world["tool"], 1.0),
                    tokenizer={"source": "union", "tokens": {"<|im_end|>": {"source": vocab_world["tool"]},
                                                             "Ġcat": {"source": vocab_world["chat"]},
                                                             "Ġdog": {"source": vocab_world["chat"], "force": True},
                                                             "<new>": {}}})
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    base, chat, tool = (weights(vocab_world[k]) for k in ("base", "chat", "tool"))
    merged, out_ids = weights(out), ids(out)
    name = "model.embed_tokens.weight"
    # base lacks <|im_end|>: it takes tool's row, then the mean of the three (as mergekit 0.1.5)
    tool_row = tool[name][ids(vocab_world["tool"])["<|im_end|>"]]
    expected = (tool_row + chat[name][ids(vocab_world["chat"])["<|im_end|>"]] + tool_row) / 3
    torch.testing.assert_close(merged[name][out_ids["<|im_end|>"]], expected)
    shared = out_ids["Ġcat"]  # every model has it and force is off: merged as usual
    torch.testing.assert_close(merged[name][shared], (base[name][shared] + chat[name][shared] + tool[name][shared]) / 3)
    forced = out_ids["Ġdog"]  # force: chat's row although every model has the token
    torch.testing.assert_close(merged[name][forced], chat[name][forced])
    assert out_ids["<new>"] == 123  # no model has it: added, its row the mean of the merged rows
    torch.testing.assert_close(merged[name][123], merged[name][:123].mean(0))
    assert "'<new>'" in (out / "README.md").read_text().split("## Notes", 1)[1]


def test_a_tokenizer_path_gives_the_output_vocabulary(vocab_world, tmp_path):
    config = linear((vocab_world["base"], 1.0), (vocab_world["chat"], 1.0), tokenizer_source=vocab_world["tool"])
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    assert ids(out) == ids(vocab_world["tool"])
    merged, base, chat = weights(out), weights(vocab_world["base"]), weights(vocab_world["chat"])
    name = "lm_head.weight"
    torch.testing.assert_close(merged[name][120], chat[name][121])  # <|im_end|> (tool's id 120): only chat has it
    # <tool> (tool's id 121): neither merged model has it, so the mean of the merged rows
    torch.testing.assert_close(merged[name][121], merged[name][:121].mean(0))
    assert merged[name].shape[0] == 122


def test_only_the_vocabulary_tensors_are_remapped(vocab_world, tmp_path):
    config = linear((vocab_world["chat"], 1.0), (vocab_world["tool"], 1.0), tokenizer_source="union")
    plan = plan_merge(load_config(config), tmp_path / "out", MergeOptions(quiet=True))
    try:
        assert sorted(j.name for j in plan.jobs if j.remap_rows) == ["lm_head.weight", "model.embed_tokens.weight"]
        assert all(j.shape[0] == 123 for j in plan.jobs if j.remap_rows)
    finally:
        plan.close()
    # two threads (embeddings remapped one at a time under a lock) give the same tensors as one
    one = weights(mergelab.merge(config, tmp_path / "one", quiet=True))
    two = weights(mergelab.merge(config, tmp_path / "two", quiet=True, threads=2))
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_identical_vocabularies_with_a_tokenizer_source_copy_the_tokenizer(vocab_world, tmp_path):
    config = linear((vocab_world["chat"], 1.0), (vocab_world["chat"], 1.0), tokenizer_source="base")
    plan = plan_merge(load_config(config), tmp_path / "out", MergeOptions(quiet=True))
    try:
        assert not any(job.remap_rows for job in plan.jobs)
    finally:
        plan.close()


@pytest.mark.parametrize("tokens, match", [
    ({"<x>": {"source": "nowhere"}}, r"tokenizer\.tokens\['<x>'\]\.source 'nowhere' is not one of the merged models"),
    ({"<tool>": {"source": "CHAT"}}, r"model '.*chat' has no token '<tool>'"),
])
def test_bad_token_sources_are_refused_before_merging(vocab_world, tmp_path, tokens, match):
    tokens = {t: {k: (vocab_world["chat"] if v == "CHAT" else v) for k, v in s.items()} for t, s in tokens.items()}
    config = linear((vocab_world["chat"], 1.0), (vocab_world["tool"], 1.0),
                    tokenizer={"source": "union", "tokens": tokens})
    with pytest.raises(MergelabError, match=match):
        mergelab.merge(config, tmp_path / "out", quiet=True)


def test_tokenizer_source_and_tokenizer_block_together_are_refused():
    with pytest.raises(MergelabError, match="sets both tokenizer_source and tokenizer.source"):
        load_config(linear(("a", 1.0), tokenizer_source="union", tokenizer={"source": "base"}))


def test_lm_cocktail_merges_models_that_differ_by_added_tokens_through_the_union(vocab_world, tmp_path):
    from mergelab.cocktail import cocktail
    from mergelab.vocab import union_if_vocabularies_differ

    assert union_if_vocabularies_differ([vocab_world["chat"], vocab_world["chat"]]) == {}
    assert union_if_vocabularies_differ([vocab_world["chat"], vocab_world["base"]]) == {"tokenizer_source": "union"}
    examples = [{"input": "the cat sat on", "output": "the mat"}, {"input": "the dog ran under", "output": "the log"}]
    result = cocktail(tmp_path / "out", finetuned=vocab_world["chat"], base=vocab_world["base"],
                      peers=[vocab_world["tool"]], examples=examples)
    out = Path(result.out_dir)
    assert sum(result.weights) == pytest.approx(1.0)
    # the target's vocabulary first, then the peers' added tokens: chat's ids are kept
    assert ids(out) == {**ids(vocab_world["chat"]), "<tool>": 122}
    merged, chat = weights(out), weights(vocab_world["chat"])
    assert merged["lm_head.weight"].shape[0] == 123
    # <|im_start|>: only the target has it, so its row is the target's (weights renormalized over it)
    torch.testing.assert_close(merged["lm_head.weight"][120], chat["lm_head.weight"][120])


def test_the_readme_vocabulary_example_merges(vocab_world, tmp_path, monkeypatch):
    import re
    import shutil

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Slices and vocabularies", 1)[1].split("\n### ", 1)[0]
    config = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)[1])
    for name in ("base", "chat"):
        shutil.copytree(vocab_world[name], tmp_path / "models" / name)
    monkeypatch.chdir(tmp_path)
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 122 and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], tokenize=False, add_generation_prompt=True)


def test_a_zero_padding_multiple_is_refused(vocab_world, tmp_path):
    config = linear((vocab_world["chat"], 1.0), (vocab_world["tool"], 1.0),
                    tokenizer={"source": "union", "pad_to_multiple_of": 0})
    with pytest.raises(MergelabError, match="tokenizer.pad_to_multiple_of must be a positive number of rows, got 0"):
        mergelab.merge(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_slices_of_models_with_different_vocabularies_merge_through_the_union(vocab_world, tmp_path):
    config = {"merge_method": "passthrough", "tokenizer_source": "union", "slices": [
        {"sources": [{"model": vocab_world["chat"], "layer_range": [0, 2]}]},
        {"sources": [{"model": vocab_world["tool"], "layer_range": [1, 2]}]}]}
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    merged, chat, tool, out_ids = weights(out), weights(vocab_world["chat"]), weights(vocab_world["tool"]), ids(out)
    # embeddings from the first slice's model (chat), lm_head from the last's (tool), rows by token
    assert torch.equal(merged["model.embed_tokens.weight"][:122], chat["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"][out_ids["<tool>"]], tool["lm_head.weight"][121])
    assert torch.equal(merged["lm_head.weight"][out_ids["<|im_end|>"]], tool["lm_head.weight"][120])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (3, 123)


def test_per_model_tensor_files_with_different_vocabularies_are_refused_before_merging(vocab_world, tmp_path):
    from safetensors.torch import save_file

    entries = []
    for name in ("chat", "tool"):
        fisher = tmp_path / f"{name}.fisher.safetensors"
        save_file({k: torch.ones_like(v) for k, v in weights(vocab_world[name]).items()}, str(fisher))
        entries.append({"model": vocab_world[name], "parameters": {"fisher": str(fisher)}})
    config = {"merge_method": "fisher", "models": entries, "tokenizer_source": "union"}
    with pytest.raises(MergelabError, match=r"fisher reads per-model fisher files.*vocabularies that differ.*"
                                            r"embed_tokens"):
        mergelab.merge(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
