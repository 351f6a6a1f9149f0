"""How many torch CPU threads a piece of work gets, and how idle OpenMP threads wait.

Every entry point that runs a model (``evaluate``, the cocktail functions, ``fisher``, SFA
streams) takes ``threads=`` (an int, ``"auto"`` — the default — or None) and runs its work
inside ``use_threads``. Studies and the grid pin one thread per process with
``use_threads(1)``; an ``"auto"`` inside a pinned block keeps the pin.

What was measured (``benchmarks/bench_threads.py``, table in benchmarks/README.md; a 2-core
VM, torch 2.13 with GNU OpenMP, 2026-11-28, while other sessions kept the load at 8-11, so
every case had busy neighbours and timings vary about 2x from run to run):

* libgomp's default wait policy is the disaster: idle threads spin, so a 2-thread process
  fights its own partner and everyone else for the cores. A forward pass on the few-shot
  batch (5 × 41 tokens) took 9x longer at 2 threads than at 1 for a 7M-parameter Llama
  (2.3 s against 0.24 s), 3.4x for 27M (5.1 s against 1.5 s), and 6-7x with one more
  CPU-bound process beside it. The issue's own runs (fewshot_weights, 4 × 27M) saw 2.9 s
  against 1.4 s.
* ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep) removes it: at 2 threads the same passes
  took about as long as at 1 (7M: 0.33 s against 0.23 s; 27M: 0.70 s against 0.76 s), faster
  only where a 2-thread process took a larger share of an oversubscribed machine from the
  others. At one thread it changes nothing (no parallel region is entered), and merge-sized
  elementwise work (16M-entry tensors) ran the same with it, within the noise.
* So for small models a second thread buys nothing measurable and risks the 3-9x stall
  wherever PASSIVE is not in force (torch imported before mergelab), and the load average
  lags a neighbour that just started by up to a minute. Whether 2 threads pay for small
  models on an idle machine could not be measured here (it never was idle): rerun the
  benchmark quietly before lowering ``SMALL_MODEL_PARAMS``.

Hence the policy of ``auto_threads``: one thread for models below ``SMALL_MODEL_PARAMS``;
otherwise as many threads as there are idle cores (the cores this process may use, less the
load of the last minute, never more than torch's own setting), and at least one. ``OMP_NUM_THREADS``
set by the user wins over all of it. ``import mergelab`` sets ``OMP_WAIT_POLICY=PASSIVE`` when
torch is not imported yet and the user chose no policy; a program that imported torch before
mergelab keeps libgomp's default, and the thread count chosen here is what protects it.

Example:
    >>> from mergelab.threads import use_threads
    >>> with use_threads("auto", work_params=27_000_000):  # doctest: +SKIP
    ...     model(**batch)
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Union

from mergelab.errors import MergelabError

Threads = Union[int, str, None]

# Below this many parameters a model runs on one thread under "auto": at 7M and 27M a second
# thread was never clearly faster and, without PASSIVE, 3-9x slower (benchmarks/bench_threads.py).
# Larger models are left to the idle-core rule; 100M is a conservative bound, not a measured knee.
SMALL_MODEL_PARAMS = 100_000_000

_pinned: ContextVar[int | None] = ContextVar("mergelab_pinned_threads", default=None)


def pinned_threads() -> int | None:
    """The count an enclosing ``use_threads(N)`` pinned (a study's worker pins 1), or None."""
    return _pinned.get()


def set_passive_wait_policy() -> bool:
    """Make OpenMP's idle threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``).

    Only possible before torch loads its OpenMP runtime: returns False (and changes nothing)
    when torch is already imported, or when the user chose a policy in the environment.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, then a cgroup CPU quota if lower)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def other_load() -> float:
    """How many cores other work keeps busy: the 1-minute load average (0 where unknown).

    It includes this process's own recent work, so a process that has computed for a minute
    sees one core less than is free: the safe side, since a thread too many costs far more
    than a thread too few.
    """
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def auto_threads(work_params: int | None = None) -> int:
    """The thread count ``"auto"`` means for work on a model of ``work_params`` parameters.

    ``OMP_NUM_THREADS``, when set, is the answer. Otherwise: 1 for a model below
    ``SMALL_MODEL_PARAMS``; else the idle cores (usable cores minus the rounded 1-minute load),
    at most torch's current setting, at least 1.
    """
    from_env = _env_threads()
    if from_env is not None:
        return from_env
    if work_params is not None and work_params < SMALL_MODEL_PARAMS:
        return 1
    import torch

    idle = usable_cores() - round(other_load())
    return max(1, min(idle, torch.get_num_threads()))


def module_params(model) -> int:
    """The parameters of a loaded ``torch.nn.Module`` (shared ones once), for ``work_params``."""
    return sum(p.numel() for p in model.parameters())


def check_threads(threads: Threads, what: str = "threads") -> Threads:
    """``threads`` if it is a whole number >= 1, ``"auto"`` or None; else a MergelabError."""
    if threads is None or threads == "auto":
        return threads
    if isinstance(threads, str) and threads.strip().isdigit():
        threads = int(threads)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise MergelabError(f"{what} must be a whole number of at least 1 or 'auto', got {threads!r}")
    return threads


def resolve_threads(threads: Threads, work_params: int | None = None) -> int | None:
    """The torch thread count for ``threads``: an int as given, ``"auto"`` as ``auto_threads``
    decides (or the count an enclosing ``use_threads(N)`` pinned), None as None (leave torch be)."""
    threads = check_threads(threads)
    if threads is None or isinstance(threads, int):
        return threads
    pinned = _pinned.get()
    return pinned if pinned is not None else auto_threads(work_params)


@contextmanager
def use_threads(threads: Threads = "auto", work_params: int | None = None) -> Iterator[int]:
    """Run a block with the torch thread count ``threads`` resolves to; restore the old one after.

    Args:
        threads: a count (pinned: every ``"auto"`` inside the block keeps it), ``"auto"`` (see
            ``auto_threads``; inside a pinned block, the pin) or None (torch's setting as it is).
        work_params: parameters of the model the block runs, for ``"auto"``'s size rule.

    Yields:
        The thread count in force inside the block.

    Example:
        >>> with use_threads(1):  # one thread per process, as the grid and the studies run
        ...     pass
    """
    import torch

    threads = check_threads(threads)
    count = resolve_threads(threads, work_params)
    previous = torch.get_num_threads()
    if count is None:
        yield previous
        return
    token = _pinned.set(count) if isinstance(threads, int) else None
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield count
    finally:
        if token is not None:
            _pinned.reset(token)
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
