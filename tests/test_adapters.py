"""PEFT LoRA adapters as merge inputs: BASE+ADAPTER and adapter directories read as merged
checkpoints, checked against PEFT's own merge_and_unload on real adapters trained a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import mergelab
from mergelab.adapters import AdapterReader, LoraAdapter, open_reader
from mergelab.devices import torch_threads
from mergelab.errors import MergelabError
from mergelab.inspection import inspect_task_vectors
from mergelab.io import CheckpointReader
from mergelab.lm import build_tokenizer, make_examples, tiny_llama, train

from conftest import save_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


# -- fixtures: real adapters, trained a few steps so that B·A is not zero ---------------------
def tiny_gpt2(seed: int = 0):
    """A GPT-2-shape causal LM over the tiny vocabulary (its linear layers are Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def train_adapter(base_dir: Path, out_dir: Path, skill: str, steps: int = 6, seed: int = 0,
                  **lora) -> Path:
    """A LoRA adapter on the model in ``base_dir``, trained ``steps`` AdamW steps on ``skill``."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora))
    tokenizer = build_tokenizer()
    train(peft_model, tokenizer, make_examples(skill, 64, seed=seed), steps=steps, lr=2e-2, batch_size=16, seed=seed)
    peft_model.save_pretrained(out_dir)
    return out_dir


def merged_by_peft(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's reference: load base + adapter, merge_and_unload, the state dict."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def lora_world(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base, a GPT-2 base, and adapters of several kinds on them (built once per
    session: the other test_adapters_* modules import this fixture)."""
    with torch_threads(1):
        return _lora_world(tmp_path_factory.mktemp("lora_world"))


def _lora_world(root: Path) -> dict[str, Path]:
    paths = {"llama": save_model(tiny_llama(seed=0), root / "llama"),
             "gpt2": save_model(tiny_gpt2(seed=0), root / "gpt2")}
    paths["sort"] = train_adapter(paths["llama"], root / "sort", "sort", r=4, lora_alpha=8,
                                  target_modules=["q_proj", "v_proj", "down_proj"])
    paths["reverse"] = train_adapter(paths["llama"], root / "reverse", "reverse", seed=1, r=4, lora_alpha=16,
                                     target_modules=["q_proj", "v_proj", "down_proj"])
    # rslora, a LoRA on the embeddings and a fully trained norm (modules_to_save)
    paths["rich"] = train_adapter(paths["llama"], root / "rich", "copy", seed=2, r=8, lora_alpha=4, use_rslora=True,
                                  target_modules=["k_proj", "o_proj", "gate_proj", "embed_tokens"],
                                  modules_to_save=["model.norm"])
    paths["dora"] = train_adapter(paths["llama"], root / "dora", "sort", seed=3, r=4, lora_alpha=8, use_dora=True,
                                  target_modules=["q_proj", "up_proj"])
    paths["gpt2_lora"] = train_adapter(paths["gpt2"], root / "gpt2_lora", "sort", seed=4, r=4, lora_alpha=8,
                                       target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return paths


def assert_states_close(got: dict, expected: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=atol, rtol=1e-5), name


# -- base+adapter as a merge input -----------------------------------------------------------
@pytest.mark.parametrize("base, adapter", [("llama", "sort"), ("llama", "rich"), ("llama", "dora"),
                                           ("gpt2", "gpt2_lora")])
def test_base_plus_adapter_equals_merge_and_unload(lora_world, tmp_path, base, adapter):
    ref = f"{lora_world[base]}+{lora_world[adapter]}"
    out = mergelab.merge({"merge_method": "passthrough", "models": [{"model": ref}]}, tmp_path / "out", quiet=True)
    expected = merged_by_peft(lora_world[base], lora_world[adapter])
    assert_states_close(load_state(out), expected)
    # the adapter moved the weights it targets (trained, not B = 0)
    original = load_state(lora_world[base])
    assert any(not torch.equal(original[name], expected[name]) for name in expected)


def test_adapter_directory_names_its_base(lora_world, tmp_path):
    config = json.loads((lora_world["sort"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora_world["llama"])
    out = mergelab.merge({"merge_method": "linear", "models": [{"model": str(lora_world["sort"]),
                                                               "parameters": {"weight": 1.0}}]},
                         tmp_path / "out", quiet=True)
    assert_states_close(load_state(out), merged_by_peft(lora_world["llama"], lora_world["sort"]))


def test_task_arithmetic_of_adapters_adds_their_deltas(lora_world, tmp_path):
    """base + Σ λ_i ΔW_i, with each ΔW_i from PEFT's merge_and_unload."""
    llama = lora_world["llama"]
    config = {"merge_method": "task_arithmetic", "base_model": str(llama), "parameters": {"lambda": 1.0},
              "models": [{"model": f"{llama}+{lora_world[name]}", "parameters": {"weight": w}}
                         for name, w in (("sort", 0.5), ("reverse", 0.25))]}
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    base = load_state(llama)
    sort, reverse = merged_by_peft(llama, lora_world["sort"]), merged_by_peft(llama, lora_world["reverse"])
    expected = {n: base[n] + 0.5 * (sort[n] - base[n]) + 0.25 * (reverse[n] - base[n]) for n in base}
    assert_states_close(load_state(out), expected)


def test_reader_interface_matches_checkpoint_reader(lora_world):
    with AdapterReader(lora_world["llama"], lora_world["rich"]) as reader, \
            CheckpointReader(lora_world["llama"]) as base:
        assert set(reader.tensors) == set(base.tensors)
        assert reader.path == base.path and reader.config == base.config
        buffer = torch.empty(1 << 20, dtype=torch.uint8)
        for name, info in reader.tensors.items():
            assert reader.get(name).shape == info.shape and reader.get(name).dtype == info.dtype
            assert torch.equal(reader.get(name, out=buffer), reader.get(name))  # into a caller's buffer, as io's
        # untouched tensors pass through; the norm in modules_to_save comes from the adapter
        assert torch.equal(reader.get("model.layers.0.input_layernorm.weight"),
                           base.get("model.layers.0.input_layernorm.weight"))
        assert not torch.equal(reader.get("model.norm.weight"), base.get("model.norm.weight"))
        assert reader.tensors["model.norm.weight"].file.name == "adapter_model.safetensors"


def test_a_path_with_plus_that_exists_is_a_plain_model(lora_world, tmp_path):
    odd = tmp_path / "base+v2"
    shutil.copytree(lora_world["llama"], odd)
    with open_reader(str(odd)) as reader:
        assert isinstance(reader, CheckpointReader)
    with open_reader(f"{odd}+{lora_world['sort']}") as reader:  # the '+' that splits two existing paths
        assert isinstance(reader, AdapterReader) and reader.path == odd


def test_inspect_accepts_adapters(lora_world):
    llama = lora_world["llama"]
    report = inspect_task_vectors(llama, [f"{llama}+{lora_world['sort']}", str(lora_world["reverse"])])
    norms = report["overall"]["norm"]
    assert all(value > 0 for value in norms.values())
    adapted = {row["name"] for row in report["tensors"] if any(v > 0 for v in row["norm"].values())}
    assert adapted == {f"model.layers.{i}.{m}.weight" for i in range(2)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


# -- one-line errors ---------------------------------------------------------------------------
def test_adapter_on_the_wrong_base_is_refused(lora_world, tmp_path):
    with pytest.raises(MergelabError, match=r"c_attn.*base model .*llama.* has no tensor"):
        mergelab.merge({"merge_method": "passthrough",
                        "models": [{"model": f"{lora_world['llama']}+{lora_world['gpt2_lora']}"}]}, tmp_path / "o")
    wide = save_model(tiny_llama(hidden=32, heads=2, seed=0), tmp_path / "narrow")
    with pytest.raises(MergelabError, match=r"LoRA factors for a 64x\d+ weight but base model .* of shape \(32, \d+\)"):
        open_reader(f"{wide}+{lora_world['sort']}")
    assert not (tmp_path / "o").exists()


def test_missing_parts_are_named(lora_world, tmp_path):
    with pytest.raises(MergelabError, match=r"'.*nowhere' does not exist; write BASE\+ADAPTER"):
        open_reader(f"{lora_world['llama']}+{tmp_path / 'nowhere'}")
    with pytest.raises(MergelabError, match="is not a PEFT adapter"):
        open_reader(f"{lora_world['llama']}+{lora_world['gpt2']}")
    orphan = shutil.copytree(lora_world["sort"], tmp_path / "orphan")
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(MergelabError, match=r"does not name its base model .* write it as BASE\+"):
        open_reader(str(orphan))
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(MergelabError, match="LoRA adapters only"):
        LoraAdapter(orphan)


def test_the_one_loader_and_its_check_take_adapters(lora_world):
    """mergelab.loading (used by eval, the grid and LM-Cocktail) loads an adapter as its base with the
    adapter merged in, and checks it against its base without loading."""
    from mergelab.loading import check_model_dir, load_model

    for ref in (str(lora_world["sort"]), f"{lora_world['llama']}+{lora_world['sort']}"):
        assert check_model_dir(ref).is_dir()
        model, tokenizer = load_model(ref)
        expected = merged_by_peft(lora_world["llama"], lora_world["sort"])
        state = model.state_dict()
        for name, tensor in expected.items():
            assert torch.allclose(state[name], tensor, atol=1e-5), name
        assert tokenizer("copy a b").input_ids
