"""Devices and CPU threads: checked before any work starts, set for a block of work."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mergelab.errors import MergelabError
from mergelab.threads import use_threads


def check_device(name: str, what: str = "device") -> torch.device:
    """``torch.device(name)``, or a MergelabError when it is malformed or absent on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergelabError(f"{what} '{name}' is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergelabError(f"{what} {name}: CUDA is not available here; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MergelabError(f"{what} {name}: MPS is not available here; use cpu")
    return device


@contextmanager
def torch_threads(count: int):
    """Run a block with ``count`` torch CPU threads, pinned: every ``threads="auto"`` inside it
    keeps ``count`` (``mergelab.threads.use_threads``). Tiny models are fastest on one thread;
    more only add synchronisation, and stall when other processes share the cores."""
    with use_threads(count):
        yield
