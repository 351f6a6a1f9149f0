"""`inspect`: cosine of task vectors and TIES sign conflicts, against direct computation."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.inspection import inspect_task_vectors
from mergelab.io import CheckpointReader


def flat_task_vector(model, base):
    m, b = CheckpointReader(model), CheckpointReader(base)
    return torch.cat([(m.get(n).float() - b.get(n).float()).reshape(-1) for n in b.tensors])


def test_overall_cosine_matches_the_flattened_task_vectors(world):
    report = inspect_task_vectors(world["base"], [world["a"], world["b"]], density=1.0)
    ta, tb = flat_task_vector(world["a"], world["base"]), flat_task_vector(world["b"], world["base"])
    expected = float(ta @ tb / (ta.norm() * tb.norm()))
    assert report["overall"]["cosine"][f"{world['a']} | {world['b']}"] == pytest.approx(expected, abs=1e-5)
    assert report["overall"]["norm"][world["a"]] == pytest.approx(float(ta.norm()), rel=1e-5)
    # independent Gaussian noise: sign conflicts on about half the entries, near-zero cosine
    assert 0.4 < report["overall"]["sign_conflict_rate"] < 0.6
    assert abs(expected) < 0.1


def test_identical_task_vectors_have_cosine_one_and_no_conflicts(world):
    report = inspect_task_vectors(world["base"], [world["a"], world["a"]], density=0.2)
    assert list(report["overall"]["cosine"].values())[0] == pytest.approx(1.0, abs=1e-6)
    assert report["overall"]["sign_conflict_rate"] == 0.0
    assert len(report["tensors"]) == 20


def test_inspect_needs_two_models(world):
    with pytest.raises(MergelabError, match="at least two"):
        inspect_task_vectors(world["base"], [world["a"]])


def test_inspect_cli_prints_a_table(world):
    result = CliRunner().invoke(main, ["inspect", world["a"], world["b"], "--base", world["base"], "--per-tensor"])
    assert result.exit_code == 0, result.output
    assert "OVERALL" in result.output and "model.norm.weight" in result.output and "sign-conflict" in result.output
