"""LoRA extraction from full fine-tunes of a tiny Llama and a tiny GPT-2 (Conv1D layers):
full rank reconstructs the fine-tune, rank r leaves exactly the SVD tail, and PEFT loads it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergelab.adapters import AdapterReader
from mergelab.adapters import extract as extract_module
from mergelab.adapters.extract import extract_lora
from mergelab.devices import torch_threads
from mergelab.errors import MergelabError
from mergelab.io import CheckpointReader
from mergelab.lm import build_tokenizer, make_examples, tiny_llama, train

from conftest import save_model
from test_adapters import tiny_gpt2

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def finetunes(tmp_path_factory):
    """Base and full fine-tune (every parameter trained a few steps) of both architectures."""
    root = tmp_path_factory.mktemp("finetunes")
    paths = {}
    with torch_threads(1):
        for name, make in (("llama", lambda: tiny_llama(seed=0)), ("gpt2", lambda: tiny_gpt2(seed=0))):
            model = make()
            paths[name] = save_model(model, root / name)
            train(model, build_tokenizer(), make_examples("sort", 64, seed=0), steps=5, lr=1e-2, batch_size=16)
            paths[f"{name}_ft"] = save_model(model, root / f"{name}_ft")
    return paths


def states(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def peft_merged(base, adapter):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_rank_reconstructs_the_finetune(finetunes, tmp_path, arch):
    base, ft = finetunes[arch], finetunes[f"{arch}_ft"]
    report = extract_lora(ft, base, tmp_path / "adapter", rank=10_000)
    assert report["overall_relative_error"] < 1e-5
    assert report["modules_to_save"]  # the embeddings and norms changed too
    target = states(ft)
    merged = peft_merged(base, tmp_path / "adapter")
    for name, value in target.items():
        assert torch.allclose(merged[name], value, atol=1e-5), name
    # the adapter is also a merge input: base+adapter reads as the fine-tune
    with AdapterReader(base, tmp_path / "adapter") as reader, CheckpointReader(ft) as finetuned:
        for name in finetuned.tensors:
            assert torch.allclose(reader.get(name), finetuned.get(name), atol=1e-5), name


def test_rank_r_error_is_the_svd_tail(finetunes, tmp_path):
    base, ft = finetunes["llama"], finetunes["llama_ft"]
    report = extract_lora(ft, base, tmp_path / "adapter", rank=3)
    base_state, ft_state = states(base), states(ft)
    merged = peft_merged(base, tmp_path / "adapter")
    assert {m["name"] for m in report["modules"]} == {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                            "mlp.down_proj")}
    for module in report["modules"]:
        name = module["name"] + ".weight"
        delta = ft_state[name] - base_state[name]
        sigma = torch.linalg.svdvals(delta.double())
        tail = math.sqrt(float(sigma[3:].square().sum()) / float(sigma.square().sum()))
        assert module["rank"] == 3
        assert module["relative_error"] == pytest.approx(tail, rel=1e-4, abs=1e-6)
        achieved = float((merged[name] - ft_state[name]).double().norm() / delta.double().norm())
        assert achieved == pytest.approx(tail, rel=1e-3, abs=1e-5)


def test_energy_picks_the_fewest_singular_values(finetunes, tmp_path):
    base, ft = finetunes["llama"], finetunes["llama_ft"]
    report = extract_lora(ft, base, tmp_path / "adapter", energy=0.9)
    base_state, ft_state = states(base), states(ft)
    for module in report["modules"]:
        name = module["name"] + ".weight"
        sigma = torch.linalg.svdvals((ft_state[name] - base_state[name]).double())
        shares = torch.cumsum(sigma.square(), 0) / sigma.square().sum()
        assert shares[module["rank"] - 1] >= 0.9 - 1e-9
        assert module["rank"] == 1 or shares[module["rank"] - 2] < 0.9
        assert module["relative_error"] <= math.sqrt(0.1) + 1e-6
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ranks = {m["rank"] for m in report["modules"]}
    assert len(ranks) > 1 and config["rank_pattern"]  # per-layer ranks, each with scale 1
    merged = peft_merged(base, tmp_path / "adapter")  # PEFT reads the per-layer ranks
    with AdapterReader(base, tmp_path / "adapter") as reader:
        for module in report["modules"]:
            name = module["name"] + ".weight"
            assert torch.allclose(reader.get(name), merged[name], atol=1e-6)


def test_randomized_svd_for_large_matrices(finetunes, tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "RANDOMIZED_ABOVE", 1000)
    report = extract_lora(finetunes["llama_ft"], finetunes["llama"], tmp_path / "adapter", rank=2)
    assert all(m["randomized"] for m in report["modules"] if min(m["shape"]) > 2 * (2 + 16))
    base_state, ft_state = states(finetunes["llama"]), states(finetunes["llama_ft"])
    for module in report["modules"]:
        name = module["name"] + ".weight"
        sigma = torch.linalg.svdvals((ft_state[name] - base_state[name]).double())
        tail = math.sqrt(float(sigma[2:].square().sum() / sigma.square().sum()))
        assert tail - 1e-6 <= module["relative_error"] <= tail * 1.01 + 1e-6


def test_extraction_errors(finetunes, tmp_path):
    with pytest.raises(MergelabError, match="either --rank or --energy"):
        extract_lora(finetunes["llama_ft"], finetunes["llama"], tmp_path / "a")
    with pytest.raises(MergelabError, match="--energy must be in"):
        extract_lora(finetunes["llama_ft"], finetunes["llama"], tmp_path / "a", energy=1.5)
    with pytest.raises(MergelabError, match="does not differ from base"):
        extract_lora(finetunes["llama"], finetunes["llama"], tmp_path / "a", rank=2)
    with pytest.raises(MergelabError, match="missing from model|has shape"):
        extract_lora(finetunes["gpt2_ft"], finetunes["llama"], tmp_path / "a", rank=2)
    assert not (tmp_path / "a").exists()


def test_cli_prints_each_layer_and_refuses_bad_options_in_one_line(finetunes, tmp_path):
    from click.testing import CliRunner

    from mergelab.cli import main

    args = ["adapters", "extract", str(finetunes["llama_ft"]), "--base", str(finetunes["llama"])]
    result = CliRunner().invoke(main, args + ["--rank", "2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output and "relative error" in result.output
    assert "saved whole (modules_to_save): " in result.output
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "error: give either --rank or --energy" in result.output
    assert not (tmp_path / "b").exists()
