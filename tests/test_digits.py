"""Split digits in worker processes: every (scenario, seed) is a unit with its own seed, so the
results are those of the sequential run, and a bad worker count is refused before training.
(The experiment's tables, plots and verdicts are tested in tests/test_continual_cli.py.)"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.continual import TrainSettings
from mergelab.studies.digits import run_digits_experiment

SMALL = dict(seeds=(0, 1), settings=TrainSettings(steps=30, batch_size=32, lr=0.05, optimizer="sgd", momentum=0.9),
             sfa_p=(0.5,), sfa_beta=(0.5,), sfa_beta_at_p=(), l2_lambda=(0.1,), ewc_lambda=(1e3,))


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_seeds_in_worker_processes_give_the_sequential_results(tmp_path):
    outputs = {workers: run_digits_experiment(tmp_path / f"w{workers}", quiet=True, scenarios=("domain",),
                                                   workers=workers, **SMALL)
               for workers in (1, 2)}
    one, two = (json.loads((outputs[w] / "results.json").read_text()) for w in (1, 2))
    assert without_timings(one) == without_timings(two)
    per_seed = one["scenarios"]["domain"]["per_seed"]
    assert len(per_seed) == 2 and per_seed[0]["runs"] != per_seed[1]["runs"]  # the seeds really differ


@pytest.mark.parametrize("workers", [0, -1])
def test_a_bad_worker_count_is_refused_before_training(tmp_path, monkeypatch, workers):
    monkeypatch.setattr("mergelab.studies.digits.run_seed", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(MergelabError, match="workers must be a whole number"):
        run_digits_experiment(tmp_path / "out", quiet=True, workers=workers)
    result = CliRunner().invoke(main, ["sfa", "--digits", "--out", str(tmp_path / "cli"), "--workers", str(workers)])
    assert result.exit_code == 2 and result.stderr.startswith("error: --workers must be a whole number")
    assert list(tmp_path.iterdir()) == []
