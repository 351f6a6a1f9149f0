"""The thread policy: what "auto" picks, pins, restoring torch's setting, the OpenMP wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.devices import torch_threads
from mergelab.threads import (SMALL_MODEL_PARAMS, auto_threads, check_threads, module_params, resolve_threads,
                              use_threads)
import mergelab.threads as threads_module


@pytest.fixture
def machine(monkeypatch):
    """A machine of 4 usable cores whose load the test sets; no OMP_NUM_THREADS; torch allowing 8 threads."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 4)
    load = {"value": 0.0}
    monkeypatch.setattr(threads_module, "other_load", lambda: load["value"])
    previous = torch.get_num_threads()
    torch.set_num_threads(8)
    yield load
    torch.set_num_threads(previous)


def test_small_models_get_one_thread_even_on_an_idle_machine(machine):
    assert auto_threads(SMALL_MODEL_PARAMS - 1) == 1
    assert auto_threads(27_000_000) == 1


def test_large_models_get_the_idle_cores(machine):
    assert auto_threads(SMALL_MODEL_PARAMS) == 4
    machine["value"] = 1.2  # one other process busy: one core fewer
    assert auto_threads(10**9) == 3
    machine["value"] = 3.6
    assert auto_threads(10**9) == 1
    machine["value"] = 9.0  # overloaded: never fewer than one
    assert auto_threads(10**9) == 1
    machine["value"] = 0.0
    assert auto_threads(None) == 4  # size unknown: the cores decide


def test_auto_never_exceeds_torch_s_own_setting(machine):
    torch.set_num_threads(2)
    assert auto_threads(10**9) == 2


def test_omp_num_threads_set_by_the_user_wins(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(1000) == 3
    assert auto_threads(10**9) == 3


def test_use_threads_sets_and_restores():
    before = torch.get_num_threads()
    with use_threads(1) as count:
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with use_threads(1):
            raise RuntimeError("the block failed")
    assert torch.get_num_threads() == before


def test_none_leaves_torch_as_it_is():
    before = torch.get_num_threads()
    with use_threads(None) as count:
        assert count == before == torch.get_num_threads()


def test_auto_inside_a_pinned_block_keeps_the_pin(machine):
    with use_threads(1):
        assert resolve_threads("auto", work_params=10**10) == 1
        with use_threads("auto", work_params=10**10) as count:
            assert count == 1 and torch.get_num_threads() == 1
    with torch_threads(2):  # the grid's and the studies' pin
        assert resolve_threads("auto", work_params=10) == 2
    assert resolve_threads("auto", work_params=10**10) == 4  # no pin outside


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True, "0"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(MergelabError, match="threads must be a whole number of at least 1 or 'auto'"):
        check_threads(bad)


def test_a_number_as_text_is_a_number():
    assert check_threads("3") == 3 and check_threads("auto") == "auto" and check_threads(None) is None


def test_module_params_counts_shared_parameters_once():
    linear = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    model = torch.nn.Sequential(linear, linear)
    assert module_params(model) == 8


def _env_without(*names):
    return {k: v for k, v in os.environ.items() if k not in names}


def test_import_mergelab_sets_the_passive_wait_policy_before_torch_loads():
    code = "import os, mergelab; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=_env_without("OMP_WAIT_POLICY"))
    assert done.stdout.split() == ["PASSIVE"]


def test_the_wait_policy_is_left_alone_after_torch_or_when_the_user_chose_one():
    code = "import os, torch, mergelab; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=_env_without("OMP_WAIT_POLICY"))
    assert done.stdout.split() == ["None"]  # too late to matter: torch's OpenMP runtime has read it
    code = "import os, mergelab; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"})
    assert done.stdout.split() == ["ACTIVE"]


@pytest.mark.parametrize("command", [["eval", "m", "--tasks", "t.yml"], ["fisher", "m", "--data", "d", "--out", "o"],
                                     ["cocktail", "weights", "--base", "b"], ["sfa", "spec.yml", "--out", "o"]])
def test_every_model_running_command_refuses_a_bad_thread_count(command):
    result = CliRunner().invoke(main, [*command, "--threads", "0"])
    assert result.exit_code == 2
    assert "--threads must be a whole number of at least 1 or 'auto', got 0" in result.output


def test_sfa_digits_refuses_threads():
    result = CliRunner().invoke(main, ["sfa", "--digits", "--out", "o", "--threads", "2"])
    assert result.exit_code == 2
    assert "--threads applies to a SPEC's stream; --digits runs one torch thread per process" in result.output
