"""How many torch CPU threads a piece of work gets, and how idle OpenMP threads wait.

Every entry point that runs a model (``evaluate``, the cocktail functions, ``fisher``, SFA
streams) takes ``threads=`` (an int, ``"auto"`` — the default — or None) and runs its work
inside ``use_threads``. Studies and the grid pin one thread per process with
``use_threads(1)``; an ``"auto"`` inside a pinned block keeps the pin.

What was measured (``benchmarks/bench_threads.py``; numbers in benchmarks/README.md, a 2-core
VM, torch 2.13 with GNU OpenMP):

* Forward passes of small Llamas on a few-shot batch (5 × 41 tokens) are not faster with 2
  threads than with 1: the matrices are too small to split (5M and 27M parameters: 1 thread
  as fast or faster; from ~110M, 2 threads start to pay on an idle machine).
* With one CPU-bound process beside it, a 2-thread process on 2 cores is many times slower
  than a 1-thread one: at every parallel region one thread waits for the other, which the
  scheduler has parked behind the neighbour. With libgomp's default wait policy the waiting
  thread also spins, taking CPU from the neighbour and from its own partner.
* ``OMP_WAIT_POLICY=PASSIVE`` makes idle OpenMP threads sleep instead of spin. It removes the
  spinning's cost to the neighbour and to the partner thread, and costs nothing at one thread
  (no parallel region is entered) nor on merge-sized elementwise work (regions of ms, not µs).
  It cannot cure the wait for a descheduled partner: only fewer threads do.

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

# Below this many parameters a forward pass on a few-shot batch is no faster on 2 threads than
# on 1 (benchmarks/bench_threads.py), and every extra thread is a liability on a busy machine.
SMALL_MODEL_PARAMS = 100_000_000

_pinned: ContextVar[int | None] = ContextVar("mergelab_pinned_threads", default=None)


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
