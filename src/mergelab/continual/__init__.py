"""Keep old skills while learning new ones (Soup to go: Sequential Fine-tuning Averaging).

* ``SFA``: the plain-loop API, ``sfa.maybe_average(model, step)`` after each optimizer step;
* ``SFACallback``: the same rule as a ``transformers.TrainerCallback``;
* baselines as small pieces: ``L2Penalty``, ``EWCPenalty`` + ``empirical_fisher``,
  ``Rehearsal``, ``union`` (multitask), ``merge_task_models`` (Task Arithmetic / TIES);
* ``CONTINUAL_METHODS``: the registry of methods a stream can run (one entry per method);
* ``run_stream``: a model on a stream of tasks with any of them, accuracy matrix, forgetting,
  BWT and L2 distances; ``run_spec`` (YAML, causal LMs) writes tables and plots.

The split-digits experiment (the paper's Figure 1) is a study above this package:
``mergelab.studies.digits``.

Example:
    >>> from mergelab.continual import SFA
    >>> sfa = SFA(model_after_task_a.state_dict(), total_steps=1000, p=0.25, beta=0.5)  # doctest: +SKIP
    >>> # in the loop, after optimizer.step():  sfa.maybe_average(model, step)
"""

from mergelab.continual.baselines import EWCPenalty, L2Penalty, Rehearsal, empirical_fisher, union
from mergelab.continual.methods import CONTINUAL_METHODS, ContinualMethod, HyperParam, Method
from mergelab.continual.posthoc import load_checkpoint, merge_task_models, save_checkpoint
from mergelab.continual.sfa import SFA, averaging_interval
from mergelab.continual.state import l2_distance, snapshot
from mergelab.continual.stream import Harness, StreamTask, TrainSettings, run_stream
from mergelab.lm import fit


def __getattr__(name):
    # transformers and the LM runner load only when asked for.
    if name == "SFACallback":
        from mergelab.continual.callback import SFACallback

        return SFACallback
    if name in ("run_spec", "load_stream_spec"):
        from mergelab.continual import lm, spec

        return getattr(lm if name == "run_spec" else spec, name)
    raise AttributeError(f"module 'mergelab.continual' has no attribute '{name}'")


__all__ = ["SFA", "SFACallback", "L2Penalty", "EWCPenalty", "empirical_fisher", "Rehearsal", "union",
           "merge_task_models", "save_checkpoint", "load_checkpoint", "averaging_interval", "l2_distance",
           "snapshot", "CONTINUAL_METHODS", "ContinualMethod", "HyperParam", "Method", "Harness", "StreamTask",
           "TrainSettings", "fit", "run_stream", "run_spec", "load_stream_spec"]
