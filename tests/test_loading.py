"""mergelab.loading: one model loader, and one clear line for each way a model directory is unusable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mergelab.lm import build_tokenizer, tiny_llama
from mergelab.errors import MergelabError
from mergelab.loading import check_model_dir, load_model, load_tokenizer, model_params


def one_line(error) -> str:
    """The message's first line; any further line must be an indented hint."""
    lines = str(error.value).splitlines()
    assert all(line.startswith("  ") for line in lines[1:]), lines
    return lines[0]


@pytest.fixture
def model_without_tokenizer(tiny_world, tmp_path):
    directory = tmp_path / "no_tokenizer"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_world["base"] / name, directory / name)
    return directory


class Opaque:
    """Stands for any non-tensor object a pickled checkpoint may carry."""


def test_load_model_returns_the_saved_model_in_eval_mode(tiny_world):
    model, tokenizer = load_model(tiny_world["base"])
    reference = tiny_llama(seed=0)
    assert not model.training
    assert len(tokenizer) == len(build_tokenizer())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_loading_prints_no_progress_bar_unless_asked_and_keeps_the_callers_setting(tiny_world, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    load_model(tiny_world["base"])
    assert capfd.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting, restored
    load_model(tiny_world["base"], progress=True)
    assert "Loading weights" in capfd.readouterr().err


def test_model_params_counts_from_the_headers(tiny_world, tmp_path):
    model = tiny_llama(seed=0)  # tied embeddings: stored once, counted once
    assert model_params(tiny_world["base"]) == sum(p.numel() for p in model.parameters())
    assert model_params(tmp_path) is None  # no model here: the thread policy decides by the cores alone


def test_encoder_kind_loads_the_bare_model(tiny_world):
    model, _ = load_model(tiny_world["base"], "encoder")
    assert not hasattr(model, "lm_head")


def test_unknown_kind_is_refused(tiny_world):
    with pytest.raises(MergelabError, match="kind 'seq2seq' is not known"):
        load_model(tiny_world["base"], "seq2seq")


def test_missing_path(tmp_path):
    with pytest.raises(MergelabError, match="does not exist") as error:
        check_model_dir(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in one_line(error)


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(MergelabError, match="is a file, not a model directory"):
        load_model(tmp_path / "weights.txt")


def test_directory_without_config_or_weights(tmp_path, tiny_world):
    with pytest.raises(MergelabError, match="holds no model: config.json is missing"):
        check_model_dir(tmp_path)
    shutil.copy(tiny_world["base"] / "config.json", tmp_path / "config.json")
    with pytest.raises(MergelabError, match="holds no model weights"):
        check_model_dir(tmp_path)


def test_missing_tokenizer_names_the_directory_and_the_option(model_without_tokenizer):
    with pytest.raises(MergelabError) as error:
        check_model_dir(model_without_tokenizer)
    first = one_line(error)
    assert f"{model_without_tokenizer} has no tokenizer" in first and "tokenizer.json" in first
    assert "--tokenizer PATH" in str(error.value)


def test_another_directory_s_tokenizer_can_stand_in(model_without_tokenizer, tiny_world):
    assert check_model_dir(model_without_tokenizer, tokenizer=tiny_world["a"]) == tiny_world["a"]
    model, tokenizer = load_model(model_without_tokenizer, tokenizer=tiny_world["a"])
    assert len(tokenizer) == len(build_tokenizer())


def test_tokenizer_option_that_is_not_a_tokenizer(model_without_tokenizer, tmp_path):
    with pytest.raises(MergelabError, match="tokenizer directory .* does not exist"):
        check_model_dir(model_without_tokenizer, tokenizer=tmp_path / "nope")
    with pytest.raises(MergelabError, match="has no tokenizer"):
        check_model_dir(model_without_tokenizer, tokenizer=model_without_tokenizer)


def test_unbuildable_tokenizer_is_one_line_with_the_hint(model_without_tokenizer):
    # A config without any vocabulary: transformers' own message is five lines long.
    (model_without_tokenizer / "tokenizer_config.json").write_text("{}")
    with pytest.raises(MergelabError) as error:
        load_tokenizer(model_without_tokenizer)
    assert one_line(error).startswith(f"cannot load the tokenizer in {model_without_tokenizer}")
    assert "--tokenizer PATH" in str(error.value)


def test_pickled_bin_checkpoint_is_refused_without_unsafe_advice(tiny_world, tmp_path):
    model = tiny_llama(seed=0)
    model.config.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    torch.save({**model.state_dict(), "extra": Opaque()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MergelabError) as error:
        load_model(tmp_path)
    first = one_line(error)
    assert f"{tmp_path / 'pytorch_model.bin'} is not a plain tensor checkpoint" in first
    assert "convert it to safetensors" in first
    assert "weights_only" not in str(error.value)


def test_plain_bin_checkpoint_loads(tiny_world, tmp_path):
    model = tiny_llama(seed=0)
    model.config.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    torch.save(dict(model.state_dict()), tmp_path / "pytorch_model.bin")
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"])


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    model = tiny_llama(seed=0)
    model.resize_token_embeddings(len(build_tokenizer()) - 2)
    model.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(MergelabError, match="the tokenizer does not belong to this model"):
        load_model(tmp_path)


def model_dir_with(tmp_path, state: dict, config_changes: dict | None = None):
    """A directory with the tiny Llama's config (optionally changed), the tokenizer and ``state``."""
    from safetensors.torch import save_file

    model = tiny_llama(seed=0)
    model.config.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    if config_changes:
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, **config_changes}))
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_checkpoint_lacking_tensors_is_refused_not_filled_with_noise(tmp_path):
    # transformers would initialize the missing tensor randomly and only log it
    state = {k: v.contiguous() for k, v in tiny_llama(seed=0).state_dict().items()
             if k not in ("model.norm.weight", "lm_head.weight")}
    with pytest.raises(MergelabError, match=r"the weights lack 1 of the model's tensors \(e\.g\. 'model\.norm\."):
        load_model(model_dir_with(tmp_path, state))


def test_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    model = tiny_llama(seed=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    directory = model_dir_with(tmp_path, state, {"intermediate_size": model.config.intermediate_size * 2})
    with pytest.raises(MergelabError, match="does not have the shape config.json implies") as error:
        load_model(directory)
    one_line(error)


@pytest.mark.parametrize("weights", [b"not a safetensors file", b"\x02\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_or_empty_safetensors_is_found_by_the_cheap_check(tmp_path, weights):
    model = tiny_llama(seed=0)
    model.config.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(weights)
    with pytest.raises(MergelabError, match=str(tmp_path)) as error:
        check_model_dir(tmp_path)
    one_line(error)
