"""The task-stream runner on the split-digits MLP: shared first stage, the accuracy-matrix
summary, SFA wired exactly as the plain API, L2 distances, every baseline, and its errors."""

from __future__ import annotations

import pytest
import torch

from mergelab import MergelabError
from mergelab.continual import Method, StreamTask, TrainSettings, fit, run_stream, snapshot, union
from mergelab.studies.digits import MLP, digits_harness, split_digits
from mergelab.continual.stream import StreamRunner, batch_drawer, make_optimizer
from mergelab.evaluate.continual import average_accuracy, backward_transfer, forgetting

SETTINGS = TrainSettings(steps=60, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return split_digits(seed=0, scenario="domain")


def fresh_runner(digits, tasks=None, settings=SETTINGS, classes=5):
    pixels, labels, default_tasks = digits
    tasks = tasks or default_tasks
    torch.manual_seed(0)
    return StreamRunner(MLP(32, classes=classes), tasks, settings, digits_harness(pixels, labels, tasks))


def test_every_method_starts_from_the_same_first_stage_and_reports_the_summary(digits):
    pixels, labels, tasks = digits
    torch.manual_seed(0)
    methods = [Method("sequential"), Method("sfa", p=0.25), Method("l2", lam=0.1), Method("ewc", lam=100.0),
               Method("rehearsal"), Method("multitask"), Method("task_arithmetic"), Method("ties")]
    result = run_stream(MLP(32, classes=5), tasks, methods, SETTINGS, digits_harness(pixels, labels, tasks))
    assert result["tasks"] == ["A (even)", "B (odd)"]
    assert [run["label"] for run in result["runs"]] == ["sequential", "SFA p=0.25 β=0.5", "L2 λ=0.1", "EWC λ=100",
                                                         "rehearsal 10%", "multitask", "task arithmetic", "TIES"]
    first_row = [result["initial"][t] for t in result["tasks"]]
    for run in result["runs"]:
        matrix = run["accuracy_matrix"]
        assert matrix[0] == first_row
        assert run["average_accuracy"] == average_accuracy(matrix)
        assert run["forgetting"] == forgetting(matrix) == [matrix[0][0] - matrix[1][0]]
        assert run["bwt"] == backward_transfer(matrix)
        assert len(run["l2_distance"]) == 2 and run["l2_distance"][0] == [] and run["l2_distance"][1][0] > 0
        assert run["diverged"] is None
    # Quality checks with wide margins (over six initialisations and two batch seeds: task A
    # 0.85-0.97, then B 0.80-0.93 while A drops by 0.55-0.75), so another CPU's rounding cannot flip them.
    assert first_row[0] > 0.6  # task A was learned (chance: 0.2)
    sequential = result["runs"][0]
    assert sequential["accuracy_matrix"][1][1] > 0.6 and sequential["forgetting"][0] > 0.3  # ... B, and A forgotten


def test_sfa_in_the_runner_is_the_plain_api_on_the_same_batches(digits):
    runner = fresh_runner(digits)
    state_a, _ = runner.initial()
    runner.run(Method("sfa", p=0.5, beta=0.3))
    from_runner = snapshot(runner.model)

    model = MLP(32, classes=5)
    model.load_state_dict(state_a)
    task_b = runner.tasks[1]
    torch.manual_seed(SETTINGS.seed * 1000 + 1)
    draw = batch_drawer(task_b.train, SETTINGS, runner.harness.collate, f"stage1:{task_b.name}")
    optimizer = make_optimizer(model, SETTINGS)
    model.train()
    for step in range(1, 61):
        runner.harness.loss(model, draw()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 30 == 0:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(0.7 * param + 0.3 * state_a[name])
    for name, value in model.state_dict().items():
        assert torch.equal(value, from_runner[name]), name


def test_sfa_once_at_the_end_shrinks_the_distance_to_the_old_model_by_one_minus_beta(digits):
    """Table 2's direction, exactly: with p = 1 SFA trains like sequential fine-tuning (same
    batches) and averages once, so ‖θ − θ_o‖ is (1 − β) times the sequential distance."""
    runner = fresh_runner(digits)
    sequential = runner.run(Method("sequential"))
    once = runner.run(Method("sfa", p=1.0, beta=0.25))
    often = runner.run(Method("sfa", p=0.1, beta=0.25))
    assert once["l2_distance"][1][0] == pytest.approx(0.75 * sequential["l2_distance"][1][0], rel=1e-5)
    assert often["l2_distance"][1][0] < once["l2_distance"][1][0]


def test_three_tasks_give_a_three_by_three_matrix_and_distances_to_every_earlier_stage(digits):
    pixels, labels, _ = digits
    rows = {name: [i for i in range(len(labels)) if labels[i] in group] for name, group in
            (("low", (0, 1)), ("mid", (2,)), ("high", (3, 4)))}
    tasks = [StreamTask(name, indices[: int(0.7 * len(indices))], indices[int(0.7 * len(indices)):])
             for name, indices in rows.items()]
    runner = fresh_runner(digits, tasks, TrainSettings(steps=15, batch_size=16, lr=0.05, optimizer="sgd"))
    for method in (Method("sfa", p=0.5), Method("ewc", lam=10.0), Method("rehearsal", fraction=0.2),
                   Method("ties", merge_parameters={"density": 0.5})):
        run = runner.run(method)
        assert [len(row) for row in run["accuracy_matrix"]] == [3, 3, 3]
        assert [len(row) for row in run["l2_distance"]] == [0, 1, 2]
        assert len(run["forgetting"]) == 2


def test_the_multitask_baseline_retrains_from_the_initial_model_on_the_union(digits):
    runner = fresh_runner(digits)
    start = snapshot(runner.model)
    run = runner.run(Method("multitask"))
    model = MLP(32, classes=5)
    model.load_state_dict(start)  # not the model after task A
    torch.manual_seed(SETTINGS.seed * 1000 + 1)
    draw = batch_drawer(union(t.train for t in runner.tasks), SETTINGS, runner.harness.collate, "multitask1")
    fit(model, draw, 2 * SETTINGS.steps, runner.harness.loss, make_optimizer(model, SETTINGS))
    assert all(torch.equal(value, snapshot(runner.model)[name]) for name, value in model.state_dict().items())
    # it keeps task A where sequential fine-tuning forgets it (0.84-0.91 against 0.18-0.34 over
    # initialisations and batch seeds), and learns B as well as sequential does, give or take
    sequential = runner.run(Method("sequential"))["accuracy_matrix"][1]
    assert run["accuracy_matrix"][1][0] > sequential[0] + 0.3 and run["accuracy_matrix"][1][1] > 0.6


def test_divergence_is_flagged_not_hidden(digits):
    runner = fresh_runner(digits, settings=TrainSettings(steps=5, batch_size=16, lr=1e30, optimizer="sgd"))
    assert runner.run(Method("l2", lam=1e30))["diverged"] == "B (odd)"


def test_errors(digits):
    pixels, labels, tasks = digits
    harness = digits_harness(pixels, labels, tasks)
    with pytest.raises(MergelabError, match="the task list is empty"):
        run_stream(MLP(), [], Method("sfa"), SETTINGS, harness)
    with pytest.raises(MergelabError, match="task 'x' has no training examples"):
        run_stream(MLP(), [StreamTask("x", [])], Method("sfa"), SETTINGS, harness)
    with pytest.raises(MergelabError, match="task names must be unique"):
        run_stream(MLP(), [tasks[0], tasks[0]], Method("sfa"), SETTINGS, harness)
    with pytest.raises(MergelabError, match="unknown continual method 'dropout'"):
        run_stream(MLP(), tasks, Method("dropout"), SETTINGS, harness)
    with pytest.raises(MergelabError, match="SFA p must be in \\(0, 1\\]"):
        run_stream(MLP(), tasks, Method("sfa", p=0), SETTINGS, harness)
    with pytest.raises(MergelabError, match="SFA beta must be in \\[0, 1\\]"):
        run_stream(MLP(), tasks, Method("sfa", beta=-1), SETTINGS, harness)
    with pytest.raises(MergelabError, match="steps lists 3 numbers for 2 tasks"):
        run_stream(MLP(), tasks, Method("sfa"), TrainSettings(steps=[1, 2, 3]), harness)
    with pytest.raises(MergelabError, match="steps must be integers of at least 1"):
        run_stream(MLP(), tasks, Method("sfa"), TrainSettings(steps=0), harness)
    bad = digits_harness(pixels, labels, tasks[:1])  # scores task A only
    with pytest.raises(MergelabError, match="returned no score for task 'B \\(odd\\)'"):
        run_stream(MLP(classes=5), tasks, Method("sequential"), SETTINGS, bad)
