"""Merges on a Ray cluster (``mergelab merge --executor ray [--address ...]``).

The driver plans the merge once (every check, before any work) and creates the output shards
in the temporary output directory: their layout is fixed up front, so every tensor has a known
byte range. The tensor jobs are then cut into contiguous groups of about equal size, one Ray
task each. A task re-plans from the same config and options on its node (headers only, and
deterministic, so it finds the same jobs, parameters and DARE seeds), attaches to the shards
and writes each merged tensor's bytes at its offset. The driver counts what came back, and the
engine writes the support files and renames the directory into place as for a local merge.
The first failed task cancels the others and fails the merge; the temporary directory is
removed, so nothing is left behind.

What the nodes must share: the input checkpoints and the output directory's parent at the same
paths (a shared file system), and the same mergelab, torch and Python (a Ray ``runtime_env`` or
one image). Inputs given as Hugging Face Hub ids must already be in each node's cache.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.errors import MergelabError

if TYPE_CHECKING:
    from mergelab.engine import MergePlan, TensorJob

TASKS_PER_CPU = 2  # groups of jobs per CPU of the cluster: enough to even out unequal tensors


def run_jobs_on_ray(plan: MergePlan, tmp: Path, progress=None) -> list[str]:
    """Run every job of ``plan`` as Ray tasks writing into the shards already laid out in
    ``tmp``; return the names written. Starts a local Ray instance (or connects to
    ``plan.options.address``) unless Ray is already initialized in this process."""
    try:
        import ray
    except ImportError:
        raise MergelabError("--executor ray needs Ray: pip install 'mergelab[distributed]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        address = plan.options.address
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise MergelabError(f"cannot connect to the Ray cluster at {address} ({exc}); check --address, or "
                                f"leave it out to start a local Ray instance") from None
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        groups = split_jobs(plan, plan.jobs, TASKS_PER_CPU * cpus)
        task = ray.remote(num_cpus=1, max_retries=0)(merge_job_group)
        spec = task_spec(plan, tmp)
        pending = [task.remote(spec, [job.name for job in group]) for group in groups]
        written: list[str] = []
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                names = ray.get(ready[0])
            except Exception as exc:  # a task's error, a lost worker or node: fail the merge
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise _user_error(exc) from None
            written += names
            if progress is not None:
                progress.update(len(names))
        return written
    finally:
        if started_here:
            ray.shutdown()


def task_spec(plan: MergePlan, tmp: Path) -> dict[str, Any]:
    """What a task needs to rebuild the plan: the config, the output directory, the options
    (run locally on one thread in the task, quietly) and the temporary directory to write in."""
    options = dataclasses.replace(plan.options, executor="local", address=None, threads=1, quiet=True)
    return {"config": plan.config, "out_dir": str(plan.out_dir), "options": options, "tmp": str(tmp)}


def merge_job_group(spec: dict[str, Any], names: list[str]) -> list[str]:
    """A Ray task: re-plan, attach to the shards, merge and write the jobs ``names``."""
    from mergelab.engine import plan_merge, run_jobs
    from mergelab.io import ShardedWriter, parse_size

    plan = plan_merge(spec["config"], spec["out_dir"], spec["options"])
    try:
        jobs = {job.name: job for job in plan.jobs}
        missing = [name for name in names if name not in jobs]
        if missing:
            raise MergelabError(f"a Ray worker planned this merge without tensor '{missing[0]}'; the inputs differ "
                                f"between nodes: every node must see the same files at the same paths")
        entries = [(job.name, job.shape, job.out_dtype) for job in plan.jobs]
        try:
            writer = ShardedWriter(Path(spec["tmp"]), entries, parse_size(plan.options.shard_size), attach=True)
        except (OSError, RuntimeError) as exc:
            raise MergelabError(f"a Ray worker cannot write the output shards in {spec['tmp']} ({exc}); the output "
                                f"directory must be on a file system every node shares") from None
        try:
            return run_jobs(plan, [jobs[name] for name in names], writer, threads=1)
        finally:
            writer.close()
    finally:
        plan.close()


def split_jobs(plan: MergePlan, jobs: list[TensorJob], parts: int) -> list[list[TensorJob]]:
    """Cut ``jobs`` (in storage order, so a task reads its inputs front to back) into at most
    ``parts`` contiguous groups of about equal work (the memory model's bytes per job)."""
    from mergelab.engine import job_bytes

    sizes = [job_bytes(plan, job) for job in jobs]
    target = sum(sizes) / max(1, min(parts, len(jobs)))
    groups: list[list[TensorJob]] = [[]]
    filled = 0.0
    for job, size in zip(jobs, sizes):
        if groups[-1] and filled + size / 2 > target:
            groups.append([])
            filled = 0.0
        groups[-1].append(job)
        filled += size
    return groups


def _user_error(exc: Exception) -> MergelabError:
    """The task's own MergelabError (one line, as a local merge raises it), or one line for
    anything else that went wrong in a task."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MergelabError):
        return MergelabError(str(cause))
    if isinstance(cause, OSError):
        return MergelabError(f"a Ray task failed writing or reading the merge: {cause}")
    first = (str(cause or exc).strip().splitlines() or [""])[-1]
    return MergelabError(f"a Ray task of the merge failed ({type(cause or exc).__name__}: {first}); nothing was "
                         f"written")
