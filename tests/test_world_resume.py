"""An interrupted world build resumes from the models it finished, and gives the same world."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from mergelab.demo import world as world_module
from mergelab.demo.world import WorldSettings, build_world, world_models

TINY_WORLD = WorldSettings(hidden=16, layers=1, heads=2, intermediate=32, train_examples=100, validation_examples=10,
                           test_examples=10, batch_size=8, base_steps=10, expert_steps=5, multitask_steps=5)


def _weights(world) -> dict:
    return {name: load_file(path / "model.safetensors") for name, path in world_models(world).items()}


@pytest.mark.slow
def test_an_interrupted_build_resumes_from_its_finished_models_and_builds_the_same_world(tmp_path, monkeypatch):
    whole = build_world(TINY_WORLD, cache=tmp_path / "whole", log=lambda *_: None, workers=1)

    real = world_module.train_world_model
    trained: list[str] = []

    def fails_on_the_multitask_model(world, start, out, *args):
        if out.name == "multitask":
            raise KeyboardInterrupt  # the user stops the build half way
        trained.append(out.name)
        return real(world, start, out, *args)

    cache = tmp_path / "resumed"
    monkeypatch.setattr(world_module, "train_world_model", fails_on_the_multitask_model)
    with pytest.raises(KeyboardInterrupt):
        build_world(TINY_WORLD, cache=cache, log=lambda *_: None, workers=1)
    root = cache / f"world-{TINY_WORLD.key()}"
    kept = cache / f".{root.name}.kept"
    assert not root.exists()  # nothing half-built is published
    assert (kept / "models" / "base" / world_module.KEPT_MARKER).is_file()
    finished = len(trained)
    assert finished == 1 + len(whole.experts)  # the base and every expert

    calls: list[str] = []

    def counts(world, start, out, *args):
        calls.append(out.name)
        return real(world, start, out, *args)

    monkeypatch.setattr(world_module, "train_world_model", counts)
    logs: list[str] = []
    resumed = build_world(TINY_WORLD, cache=cache, log=logs.append, workers=1)
    assert any("resuming an interrupted build" in line for line in logs)
    assert not kept.exists()  # published: the kept models are removed
    assert resumed.scores == whole.scores
    first, again = _weights(whole), _weights(resumed)
    for name in first:
        for tensor in first[name]:
            assert first[name][tensor].equal(again[name][tensor]), (name, tensor)


@pytest.mark.slow
def test_an_instruction_world_takes_the_cached_plain_worlds_base_which_it_would_train_bit_for_bit(tmp_path):
    from dataclasses import replace

    instruction = replace(TINY_WORLD, base_kind="instruction", instruction_steps=5)
    alone = build_world(instruction, cache=tmp_path / "alone", log=lambda *_: None, workers=1)  # trains its own

    shared = tmp_path / "shared"
    build_world(TINY_WORLD, cache=shared, log=lambda *_: None, workers=1)
    logs: list[str] = []
    reused = build_world(instruction, cache=shared, log=logs.append, workers=1)
    assert any("taken from the cached plain world" in line for line in logs)
    assert reused.scores == alone.scores
    for name in ("base-general", "base", "multitask"):
        first = load_file(alone.root / "models" / name / "model.safetensors")
        again = load_file(reused.root / "models" / name / "model.safetensors")
        assert all(first[t].equal(again[t]) for t in first), name
