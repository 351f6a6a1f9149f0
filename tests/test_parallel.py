"""Worker processes for independent work: one torch thread each, the sequential run's results,
a worker's user error raised again as itself, and an interrupt that stops the workers."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import yaml

from mergelab import MergelabError
from mergelab.demo import world as world_module
from mergelab.demo.world import WorldSettings, build_world, score_model
from mergelab.parallel import check_workers, usable_cores, worker_pool

TINY_WORLD = WorldSettings(hidden=16, layers=1, heads=2, intermediate=32, train_examples=100, validation_examples=10,
                           test_examples=10, batch_size=8, base_steps=10, expert_steps=5, multitask_steps=5)


@pytest.fixture(scope="module")
def pool():
    with worker_pool(2) as shared:
        yield shared


def test_workers_default_to_the_usable_cores_and_refuse_nonsense():
    assert check_workers(None) == usable_cores() >= 1
    assert usable_cores() <= len(os.sched_getaffinity(0))
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(MergelabError, match="workers must be a whole number of processes, 1 or more"):
            check_workers(bad)


def test_units_run_in_other_processes_on_one_torch_thread(pool):
    pids = pool.map(os.getpid, [()] * 4)
    assert os.getpid() not in pids
    assert pool.map(torch.get_num_threads, [()] * 4) == [1, 1, 1, 1]
    assert pool.map(pow, [(2, 3), (3, 2), (5, 0)]) == [8, 9, 1]  # results in the order given


def test_a_user_error_in_a_worker_is_the_same_mergelab_error(pool, tmp_path):
    missing, tasks = tmp_path / "no-model", tmp_path / "tasks.yml"
    tasks.write_text(yaml.safe_dump({"tasks": [{"name": "t", "kind": "loss", "examples": [{"text": "copy 1"}]}]}))
    with pytest.raises(MergelabError) as here:
        with worker_pool(1) as sequential:
            sequential.map(score_model, [(missing, tasks)])
    with pytest.raises(MergelabError) as there:
        pool.map(score_model, [(missing, tasks)])
    assert str(there.value) == str(here.value) and "no-model" in str(here.value)
    assert pool.map(pow, [(2, 2)]) == [4]  # the pool still works after a unit failed


def test_an_interrupt_stops_the_workers_at_once():
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(2) as pool:
            pids = set(pool.map(os.getpid, [()] * 4))
            pool.submit(time.sleep, 600)
            raise KeyboardInterrupt
    for pid in pids:  # terminated and reaped, not left sleeping
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_a_world_built_by_workers_equals_the_sequential_build(pool, tmp_path):
    one = build_world(TINY_WORLD, cache=tmp_path / "one", log=lambda *_: None, workers=1)
    two = build_world(TINY_WORLD, cache=tmp_path / "two", log=lambda *_: None, workers=pool)
    assert one.scores == two.scores and set(one.scores) == {"base", "multitask", *(f"expert-{t}" for t in one.experts)}
    weights = sorted(p.relative_to(one.root) for p in one.root.rglob("*.safetensors"))
    assert len(weights) == 10
    for path in weights:  # every model, bit for bit
        assert (one.root / path).read_bytes() == (two.root / path).read_bytes(), path
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f".{two.root.name}.lock", two.root.name]


@pytest.mark.slow
def test_two_builds_of_one_world_at_once_train_it_once(tmp_path, monkeypatch):
    trained, logs = [], []
    original = world_module.train
    monkeypatch.setattr(world_module, "train", lambda *a, **k: trained.append(1) or original(*a, **k))
    worlds = []

    def build():
        worlds.append(build_world(TINY_WORLD, cache=tmp_path, log=logs.append, workers=1))

    builders = [threading.Thread(target=build) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert len(trained) == 10  # base, 8 experts, multitask: once
    assert worlds[0].root == worlds[1].root and worlds[0].scores == worlds[1].scores
    assert any("waiting for it" in line for line in logs) and any("reusing" in line for line in logs)


def _note(message: str) -> None:
    import logging

    logging.getLogger("mergelab").warning(message)


def test_quiet_workers_do_not_print_the_librarys_plan_notes(capfd):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # how the demo and the studies ask for quiet library output
    try:
        with worker_pool(2) as quiet:
            quiet.map(_note, [("ties differs from mergekit here: a note",)] * 2)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    assert "differs from mergekit" not in capfd.readouterr().err
