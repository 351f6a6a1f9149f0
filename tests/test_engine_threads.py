"""Local merges on several threads within a memory budget: the same bytes whatever the thread
count or budget, reusable read buffers, and the budget's accounting."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import mergelab
from mergelab.config import MergeOptions
from mergelab.engine import MemoryBudget, Workspace, merge_threads
from mergelab.errors import MergelabError
from mergelab.io import CheckpointReader


def files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.suffix == ".safetensors"}


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_threads_and_budget_do_not_change_the_output(world, tmp_path, method):
    config = {"merge_method": method, "models": [{"model": world[m]} for m in "abc"],
              "parameters": {"weight": 1.0, **({"density": 0.4} if method != "linear" else {})}}
    if method != "linear":
        config["base_model"] = world["base"]
    outputs = []
    for threads, budget in [(1, "2.5GB"), (3, "2.5GB"), ("auto", "1MB"), (2, "1B")]:  # 1 byte: one job at a time
        out = mergelab.merge(config, tmp_path / f"{threads}-{budget}", threads=threads, max_memory=budget,
                             quiet=True, seed=5)
        outputs.append(files(out))
    assert all(output == outputs[0] for output in outputs[1:])


def test_reads_into_a_reused_buffer_equal_fresh_reads(world):
    reader = CheckpointReader(world["c"])  # sharded
    largest = max(info.dtype.itemsize * torch.Size(info.shape).numel() for info in reader.tensors.values())
    buffer = torch.empty(largest, dtype=torch.uint8)
    for name in reader.tensors:
        assert torch.equal(reader.get(name, out=buffer), reader.get(name))
    with pytest.raises(ValueError, match="at least"):
        reader.get(next(iter(reader.tensors)), out=torch.empty(1, dtype=torch.uint8))
    workspace = Workspace()
    name = next(n for n, info in reader.tensors.items() if len(info.shape) == 2)
    first = workspace.load(reader, name, 0, torch.float32, torch.device("cpu"))
    again = workspace.load(reader, name, 0, torch.float32, torch.device("cpu"))
    assert torch.equal(first, reader.get(name).float())
    assert again.data_ptr() == first.data_ptr()  # the same slot, not a new allocation
    reader.close()


def test_budget_holds_large_jobs_back_until_the_memory_is_free():
    budget = MemoryBudget(total=100, threads=2)
    big, small, peaks, order = Workspace(), Workspace(), [], []

    def job(workspace, need, name, seconds):
        with budget.hold(workspace, need):
            peaks.append(budget.used)
            order.append(name)
            time.sleep(seconds)

    first = threading.Thread(target=job, args=(big, 70, "first", 0.3))
    first.start()
    time.sleep(0.05)
    job(small, 50, "second", 0)  # 70 + 50 > 100: waits for the first to let go
    first.join()
    assert order == ["first", "second"] and max(peaks) <= 100
    job(small, 500, "alone", 0)  # larger than the budget: runs once nothing else is held
    assert budget.used <= 100


def test_thread_and_memory_options_are_checked_before_work(world, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": world["a"]}, {"model": world["b"]}],
              "parameters": {"weight": 1.0}}
    for options, message in [({"threads": 0}, "--threads must be a whole number, at least 1, or auto; got 0"),
                             ({"threads": "many"}, "--threads must be .* or auto; got 'many'"),
                             ({"max_memory": "lots"}, "--max-memory 'lots' is not a size"),
                             ({"executor": "dask"}, "--executor 'dask' is not known; use local or ray"),
                             ({"address": "ray://x:10001"}, "--address .* needs --executor ray")]:
        with pytest.raises(MergelabError, match=message):
            mergelab.merge(config, tmp_path / "out", quiet=True, **options)
    assert not (tmp_path / "out").exists()
    assert MergeOptions(threads="3").threads == 3  # as the command line passes it
    assert 1 <= merge_threads(MergeOptions()) <= 4


def test_auto_merge_threads_follow_a_pinned_thread_count():
    """A merge inside use_threads(1) (as in a study's worker process) runs one tensor at a time."""
    from mergelab.config import MergeOptions
    from mergelab.engine import merge_threads
    from mergelab.threads import use_threads

    with use_threads(1):
        assert merge_threads(MergeOptions(threads="auto")) == 1
    with use_threads(3):
        assert merge_threads(MergeOptions(threads="auto")) == 3
    assert merge_threads(MergeOptions(threads=2)) == 2
