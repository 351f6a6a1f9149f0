"""Merges as Ray tasks (``executor="ray"``) on a local 2-worker Ray instance: the same bytes as
a local merge, seeded DARE masks included, and a failing task leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import mergelab
from mergelab.errors import MergelabError

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow  # Ray's start-up alone takes seconds

CONFIGS = {
    "linear": {"merge_method": "linear", "models": ["a", "b", "c"], "parameters": {"weight": 1.0}},
    "ties": {"merge_method": "ties", "base_model": "base", "models": ["a", "b", "c"],
             "parameters": {"weight": 1.0, "density": 0.3}},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base", "models": ["a", "b", "c"],
                  "parameters": {"weight": 1.0, "density": 0.4}},
}


def materialize(config: dict, world: dict) -> dict:
    config = dict(config, models=[{"model": world[m]} for m in config["models"]])
    if "base_model" in config:
        config["base_model"] = world[config["base_model"]]
    return config


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.name != "README.md"}


def test_ray_merges_are_byte_identical_to_local_ones(local_ray, world, tmp_path):
    for method, config in CONFIGS.items():
        config = materialize(config, world)
        local = mergelab.merge(config, tmp_path / f"{method}-local", threads=1, quiet=True, seed=3,
                               shard_size="100KB")
        remote = mergelab.merge(config, tmp_path / f"{method}-ray", executor="ray", quiet=True, seed=3,
                                shard_size="100KB")
        local_files, remote_files = files(local), files(remote)
        assert len([n for n in local_files if n.endswith(".safetensors")]) > 1  # several shards, several tasks
        assert local_files.keys() == remote_files.keys()
        for name in local_files:
            assert local_files[name] == remote_files[name], f"{method}: {name} differs"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dare_ties-ray", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()


def test_a_failing_task_fails_the_merge_and_leaves_nothing(local_ray, world, tmp_path):
    broken = tmp_path / "inputs" / "broken"
    broken.mkdir(parents=True)
    source = Path(world["a"])
    for item in source.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = sorted(n for n in weights if n.endswith("mlp.up_proj.weight"))[-1]
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    config = {"merge_method": "linear", "models": [{"model": str(broken)}, {"model": world["b"]}],
              "parameters": {"weight": 1.0}}
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    with pytest.raises(MergelabError, match=rf"tensor '{name}' contains 1 NaN/Inf values") as error:
        mergelab.merge(config, out, executor="ray", quiet=True, shard_size="100KB")
    assert "\n" not in str(error.value).split("\n  ")[0]  # one line, as a local merge says it
    assert list(out.parent.iterdir()) == []  # neither the output nor a temporary directory
