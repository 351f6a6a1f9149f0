"""Independent units of work (grid cells, demo experts, split-digit seeds) in worker
processes, one torch thread each.

A unit is a module-level function and picklable arguments; it gets the same inputs (and so the
same seeds) whichever process runs it, so a run with ``workers=N`` gives the numbers of the
sequential run (``workers=1``, in this process, on the same number of threads).

Workers are started with the "spawn" method (torch after ``fork`` is unsafe), pin their torch
thread count before any work, ignore Ctrl-C (the parent owns the interrupt) and turn SIGTERM
into ``SystemExit`` where the unit was, so that an output it was writing is removed as in the
parent, and then exit. An
exception in a unit (a ``MergelabError`` included) is raised again in the parent, the same
type with the same message. When the parent fails or is interrupted, pending units are
cancelled and the workers are terminated and joined before the caller cleans up.

Example:
    >>> with worker_pool(2) as pool:  # doctest: +SKIP
    ...     squares = pool.map(pow, [(2, 2), (3, 2)])
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

from mergelab.errors import MergelabError
from mergelab.threads import usable_cores


def check_workers(workers: int | None, what: str = "workers") -> int:
    """``workers`` as a positive count (None: the usable cores); anything else is a user error."""
    if workers is None:
        return usable_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MergelabError(f"{what} must be a whole number of processes, 1 or more; got {workers!r}")
    return workers


class WorkerPool:
    """Run units in ``workers`` processes (``workers=1``: in this process), each on ``threads``
    torch threads. Results come back in the order the units were given."""

    def __init__(self, workers: int, threads: int = 1):
        self.workers = workers
        self.threads = threads
        self._executor: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            progress_off = _progress_bars_disabled()
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(self.threads, progress_off))
        return self._executor

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Start one unit; with one worker it runs here and now, and the future is already done."""
        if self.workers > 1:
            return self._start().submit(run_pinned, self.threads, fn, args, kwargs)
        future: Future = Future()
        try:
            future.set_result(run_pinned(self.threads, fn, args, kwargs))
        except Exception as exc:  # an interrupt is not a result: it stops the caller at once
            future.set_exception(exc)
        return future

    def imap(self, fn: Callable[..., Any], arguments: Iterable[Sequence[Any]]) -> Iterator[Any]:
        """``fn(*args)`` for each ``args``, yielded in order. With several workers every unit is
        submitted now (so units of later calls queue behind them); with one, each runs in this
        process when the caller asks for its result."""
        if self.workers == 1:
            return (self.submit(fn, *args).result() for args in arguments)
        return self._results([self.submit(fn, *args) for args in arguments])

    @staticmethod
    def _results(futures: list[Future]) -> Iterator[Any]:
        try:
            for future in futures:
                yield future.result()
        finally:  # a unit failed or the caller stopped early: units not started yet never start
            for future in futures:
                future.cancel()

    def map(self, fn: Callable[..., Any], arguments: Iterable[Sequence[Any]]) -> list[Any]:
        """``[fn(*args) for args in arguments]``, the units run in parallel."""
        return list(self.imap(fn, arguments))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def terminate(self) -> None:
        """Cancel what has not started and stop the workers (SIGTERM: a unit removes what it was
        writing), then wait for them to exit."""
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


@contextmanager
def worker_pool(workers: int | WorkerPool | None = None, threads: int = 1) -> Iterator[WorkerPool]:
    """A ``WorkerPool`` for a block of work: ``workers`` processes (None: the usable cores), or
    an existing pool to share (left running for its owner). The workers are started on the first
    unit and closed after the block. If the block fails or is interrupted they are terminated
    first, so that no unit writes on while the caller cleans up (a shared pool starts new ones
    on its next unit)."""
    shared = isinstance(workers, WorkerPool)
    pool = workers if shared else WorkerPool(check_workers(workers), threads)
    try:
        yield pool
    except BrokenProcessPool:
        pool.terminate()
        raise MergelabError(_BROKEN) from None
    except BaseException:  # nothing the block started may write on while its caller cleans up
        pool.terminate()
        raise
    if not shared:
        pool.close()


_BROKEN = ("a worker process stopped without finishing its work (killed for lack of memory or by a signal?); "
           "run with workers=1 (--workers 1) to do the work in this process\n"
           "a script that starts workers must guard its top level with `if __name__ == \"__main__\":`")


def _progress_bars_disabled() -> bool:
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers.utils import logging as hf_logging

    return not hf_logging.is_progress_bar_enabled()


class _Terminated(SystemExit):
    """SIGTERM in a worker: raised where the unit was, so that what it was writing is removed."""

    code = 128 + signal.SIGTERM


def _exit_on_sigterm(signum, frame):
    raise _Terminated(_Terminated.code)


def run_pinned(threads: int, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)`` with torch pinned to ``threads`` threads (every ``threads="auto"``
    of the library inside keeps the pin)."""
    from mergelab.threads import use_threads

    try:
        with use_threads(threads):
            return fn(*args, **kwargs)
    except _Terminated:  # the unit has cleaned up (its finally blocks ran); the worker stops here
        os._exit(_Terminated.code)


def _start_worker(threads: int, progress_off: bool) -> None:
    """Runs once in each worker, before any unit. Until it returns, SIGTERM kills at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    import torch

    torch.set_num_threads(threads)  # before any work; each unit pins it again (run_pinned)
    if progress_off:
        import logging

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # the parent asked for quiet library output: a study's units would otherwise print the same
        # plan note (e.g. "ties differs from mergekit") once per merge through logging's last resort
        logging.getLogger("mergelab").addHandler(logging.NullHandler())
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
