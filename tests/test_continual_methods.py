"""The registry of continual methods: every method's parameters and behaviour come from its
entry, so a new method is one entry that the spec parser, the runner and the report pick up."""

from __future__ import annotations

import pytest
import torch

from mergelab import MergelabError
from mergelab.continual import CONTINUAL_METHODS, ContinualMethod, HyperParam, Method, TrainSettings, run_stream
from mergelab.continual.methods import Training
from mergelab.continual.report import plane_panels, save_plane_figure, stream_table
from mergelab.continual.spec import expand_method, load_stream_spec
from mergelab.continual.state import snapshot
from mergelab.studies.digits import MLP, digits_harness, split_digits

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = TrainSettings(steps=8, batch_size=16, lr=0.05, optimizer="sgd", seed=0)


def test_every_entry_describes_its_parameters():
    for name, entry in CONTINUAL_METHODS.items():
        assert entry.name == name and entry.summary and entry.paper
        defaults = Method(name)
        for param in entry.params:
            assert param.help
            assert getattr(defaults, param.name) == param.check(param.default)  # the default passes its check
        assert Method(name).to_dict() == {"name": name, **{p.name: getattr(defaults, p.name) for p in entry.params}}


def test_a_method_takes_only_its_own_parameters_by_attribute_or_spec_key():
    assert Method("l2", **{"lambda": 0.3}).lam == Method("l2", lam=0.3).lam == 0.3
    with pytest.raises(MergelabError, match=r"method 'l2' does not use p \(only sfa do\)"):
        Method("l2", p=0.5)
    with pytest.raises(MergelabError, match="method 'sequential' does not use fraction"):
        Method("sequential", fraction=0.2)
    with pytest.raises(MergelabError, match="rehearsal fraction must be in"):
        Method("rehearsal", fraction=1.5)
    with pytest.raises(MergelabError, match="fisher_samples must be a whole number"):
        Method("ewc", fisher_samples=0)


def test_only_sweep_parameters_expand():
    runs = expand_method({"method": "ewc", "lambda": [1, 10], "fisher_samples": 8})
    assert [(m.lam, m.fisher_samples) for m in runs] == [(1.0, 8), (10.0, 8)]
    with pytest.raises(MergelabError, match="fisher_samples must be a whole number"):
        expand_method({"method": "ewc", "fisher_samples": [8, 16]})  # not a sweep parameter


def _pull_halfway(stage):
    """At the end of a task: move every weight a ``share`` of the way back to the anchor."""
    with torch.no_grad():
        for name, tensor in stage.model.state_dict(keep_vars=True).items():
            if tensor.dtype.is_floating_point:
                tensor.mul_(1 - stage.method.share).add_(stage.anchor[name] * stage.method.share)


def _train_then_pull(stage):
    return Training(stage.task.train, stage.steps, stage.runner.stage_key(stage.index))


def share_check(value):
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise MergelabError(f"share must be in [0, 1], got {value!r}")
    return float(value)


PULL = ContinualMethod("pull", "train, then pull back to the previous task once", "a test's own method",
                       title=lambda v: f"pull {v['share']:g}", start=_train_then_pull, end=_pull_halfway,
                       params=(HyperParam("share", 0.5, share_check, "how far back", sweep=True, symbol="s"),),
                       short="pull", line="-.", color="tab:cyan")


def test_a_new_method_is_one_registry_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(CONTINUAL_METHODS, "pull", PULL)
    spec = load_stream_spec({"model": "tiny", "tasks": [{"name": "a", "demo": "copy"}, {"name": "b", "demo": "sort"}],
                             "methods": ["sequential", {"method": "pull", "share": [0.0, 1.0]}]})
    methods = spec.all_methods()
    assert [m.title for m in methods] == ["sequential", "pull 0", "pull 1"]
    with pytest.raises(MergelabError, match="share must be in"):
        expand_method({"method": "pull", "share": 2})

    pixels, labels, tasks = split_digits(seed=0, scenario="domain")
    torch.manual_seed(0)
    result = run_stream(MLP(16, classes=5), tasks, methods, SETTINGS, digits_harness(pixels, labels, tasks))
    sequential, kept, undone = result["runs"]
    assert kept["accuracy_matrix"] == sequential["accuracy_matrix"]  # share 0: plain training
    assert undone["accuracy_matrix"][1] == undone["accuracy_matrix"][0]  # share 1: back to the first task's model
    assert undone["l2_distance"][1][0] == 0.0 and undone["method"] == {"name": "pull", "share": 1.0}
    assert "| pull 1 |" in stream_table(result)
    assert plane_panels(result["runs"]) == [("p", "task plane")]  # no method with two sweep parameters ran
    save_plane_figure(tmp_path / "plane.png", result, [("share", "pull")])
    assert (tmp_path / "plane.png").stat().st_size > 1000


def test_the_runner_leaves_the_model_to_the_registry(monkeypatch):
    """A method whose entry neither trains nor ends leaves each stage's model as the previous one."""
    monkeypatch.setitem(CONTINUAL_METHODS, "frozen", ContinualMethod(
        "frozen", "does nothing", "none", title=lambda v: "frozen", start=lambda stage: None))
    pixels, labels, tasks = split_digits(seed=0, scenario="domain")
    torch.manual_seed(0)
    model = MLP(16, classes=5)
    result = run_stream(model, tasks, Method("frozen"), SETTINGS, digits_harness(pixels, labels, tasks))
    assert result["runs"][0]["l2_distance"][1][0] == 0.0
    assert all(torch.isfinite(t).all() for t in snapshot(model).values())


def test_a_sweep_may_name_a_parameter_by_its_attribute_or_its_spec_key():
    by_key = [m.lam for m in expand_method({"method": "l2", "lambda": [0.1, 1]})]
    by_name = [m.lam for m in expand_method({"method": "l2", "lam": [0.1, 1]})]
    assert by_key == by_name == [0.1, 1.0]
