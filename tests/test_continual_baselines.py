"""The baselines as the paper and EWC define them, checked on hand-computed cases, plus the
paper's Section 4 identity between one L2-penalised SGD step and SFA averaging every step."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from mergelab import MergelabError
from mergelab.continual import (
    SFA,
    EWCPenalty,
    L2Penalty,
    Rehearsal,
    empirical_fisher,
    load_checkpoint,
    merge_task_models,
    save_checkpoint,
    snapshot,
    union,
)
from mergelab.lm import tiny_llama


def linear(weight: list[float], bias: float = 0.0) -> torch.nn.Linear:
    layer = torch.nn.Linear(len(weight), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)
    return layer


def test_l2_penalty_value_and_gradient():
    model, anchor = linear([1.0, 2.0], 0.5), linear([0.0, 4.0], 0.5)
    penalty = L2Penalty(model, anchor.state_dict(), lam=0.3)()
    assert penalty.item() == pytest.approx(0.5 * 0.3 * (1.0 + 4.0))  # λ/2 ‖θ − θ_o‖²
    penalty.backward()
    assert torch.allclose(model.weight.grad, 0.3 * torch.tensor([[1.0, -2.0]]))  # λ (θ − θ_o)


def test_ewc_penalty_weights_each_entry_by_its_fisher():
    model, anchor = linear([1.0, 2.0], 1.0), linear([0.0, 0.0], 0.0)
    fisher = {"weight": torch.tensor([[2.0, 0.5]]), "bias": torch.tensor([0.0])}
    penalty = EWCPenalty(model, anchor, fisher, lam=4.0)()
    assert penalty.item() == pytest.approx(0.5 * 4.0 * (2.0 * 1.0 + 0.5 * 4.0 + 0.0))
    penalty.backward()
    assert torch.allclose(model.weight.grad, 4.0 * torch.tensor([[2.0 * 1.0, 0.5 * 2.0]]))


def test_empirical_fisher_is_the_mean_squared_per_example_gradient():
    model = linear([0.5, -1.0], 0.0)
    examples = [(torch.tensor([1.0, 2.0]), 1.0), (torch.tensor([3.0, 0.0]), -1.0)]

    def collate(batch):
        return torch.stack([x for x, _ in batch]), torch.tensor([[y] for _, y in batch])

    def loss(m, batch):  # squared error: ∂/∂w = 2 (w·x + b − y) x
        inputs, targets = batch
        return (m(inputs) - targets).square().mean()

    fisher = empirical_fisher(model, examples, loss, collate, samples=None)
    residuals = [0.5 * 1 - 1.0 * 2 - 1.0, 0.5 * 3 + 1.0]  # −2.5, 2.5
    grads = [2 * r * x for r, (x, _) in zip(residuals, examples)]
    expected = (grads[0].square() + grads[1].square()) / 2
    assert torch.allclose(fisher["weight"][0], expected)
    assert torch.allclose(fisher["bias"], torch.tensor([(4 * 2.5 ** 2 + 4 * 2.5 ** 2) / 2]))
    assert model.weight.grad is None


def test_one_l2_sgd_step_equals_sfa_averaging_after_every_step():
    """Paper Eq. 3 vs Eq. 7: with β = ηλ and α = η / (1 − ηλ) the two updates coincide."""
    torch.manual_seed(0)
    start, theta_o = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    inputs, targets = torch.randn(16, 3), torch.randn(16, 2)
    eta, lam, steps = 0.1, 0.5, 5

    l2_model = copy.deepcopy(start)
    penalty = L2Penalty(l2_model, theta_o.state_dict(), lam)
    optimizer = torch.optim.SGD(l2_model.parameters(), lr=eta)
    for _ in range(steps):
        (torch.nn.functional.mse_loss(l2_model(inputs), targets) + penalty()).backward()
        optimizer.step()
        optimizer.zero_grad()

    sfa_model = copy.deepcopy(start)
    sfa = SFA(theta_o.state_dict(), total_steps=steps, p=1 / steps, beta=eta * lam)
    optimizer = torch.optim.SGD(sfa_model.parameters(), lr=eta / (1 - eta * lam))
    for step in range(1, steps + 1):
        torch.nn.functional.mse_loss(sfa_model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert sfa.maybe_average(sfa_model, step)

    for a, b in zip(l2_model.parameters(), sfa_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_penalties_check_the_anchor():
    with pytest.raises(MergelabError, match="L2 anchor lacks tensor 'bias'"):
        L2Penalty(linear([1.0]), {"weight": torch.zeros(1, 1)}, lam=1.0)
    with pytest.raises(MergelabError, match="Fisher lacks parameter 'bias'"):
        EWCPenalty(linear([1.0]), linear([0.0]), {"weight": torch.ones(1, 1)}, lam=1.0)
    with pytest.raises(MergelabError, match="lambda must be a finite number ≥ 0"):
        L2Penalty(linear([1.0]), linear([0.0]), lam=-1)


def test_rehearsal_mixes_the_fraction_of_old_examples_in_expectation():
    old, new = [("old", i) for i in range(100)], [("new", i) for i in range(100)]
    buffer = Rehearsal(old, fraction=0.1)
    rng = random.Random(0)
    batches = [buffer.draw(new, 32, rng) for _ in range(2000)]
    assert all(len(batch) == 32 for batch in batches)
    old_share = sum(kind == "old" for batch in batches for kind, _ in batch) / (32 * 2000)
    assert old_share == pytest.approx(0.1, abs=0.005)
    assert {len([e for e in batch if e[0] == "old"]) for batch in batches} == {3, 4}  # 3.2 rounded at random


def test_rehearsal_buffer_size_and_errors():
    assert len(Rehearsal(list(range(50)), buffer_size=10).buffer) == 10
    with pytest.raises(MergelabError, match="fraction must be in \\(0, 1\\)"):
        Rehearsal([1], fraction=1.0)
    with pytest.raises(MergelabError, match="the buffer is empty"):
        Rehearsal([], fraction=0.1)


def test_union_is_every_example_of_every_task():
    assert union([[1, 2], [3], []]) == [1, 2, 3]


# -- post-hoc merging through the merge core -------------------------------------------------------
def test_task_arithmetic_of_per_task_models_is_base_plus_mean_task_vector(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    experts = [copy.deepcopy(base) for _ in range(2)]
    for index, expert in enumerate(experts):
        with torch.no_grad():
            for param in expert.parameters():
                param.add_(torch.randn(param.shape) * (index + 1))
    base_dir = save_checkpoint(base, tmp_path / "base")
    dirs = [save_checkpoint(e, tmp_path / f"expert{i}") for i, e in enumerate(experts)]
    merged = copy.deepcopy(base)
    load_checkpoint(merged, merge_task_models("task_arithmetic", base_dir, dirs, tmp_path / "ta"))
    for name, value in merged.state_dict().items():
        b = base.state_dict()[name]
        expected = b + 0.5 * sum(e.state_dict()[name] - b for e in experts)  # λ = 1/N
        assert torch.allclose(value, expected, atol=1e-6), name
    ties = copy.deepcopy(base)
    load_checkpoint(ties, merge_task_models("ties", base_dir, dirs[:1], tmp_path / "ties", {"density": 1.0}))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ties.parameters(), experts[0].parameters()))


def test_checkpoints_of_tied_models_round_trip(tmp_path):
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    load_checkpoint(other, save_checkpoint(model, tmp_path / "tied"))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model).values(), snapshot(other).values()))
    assert other.lm_head.weight is other.model.embed_tokens.weight


def test_unknown_posthoc_method(tmp_path):
    with pytest.raises(MergelabError, match="post-hoc baseline 'dare' is not a merge method .* choose one of: "
                                            "arcee_fusion, breadcrumbs"):
        merge_task_models("dare", tmp_path, [tmp_path], tmp_path / "out")
    with pytest.raises(MergelabError, match="post-hoc baseline 'linear' is not a merge method that adds task vectors"):
        merge_task_models("linear", tmp_path, [tmp_path], tmp_path / "out")


def test_posthoc_configs_take_the_papers_settings_and_any_registered_method(tmp_path):
    from mergelab.continual.posthoc import posthoc_config

    experts = [tmp_path / "x", tmp_path / "y", tmp_path / "z"]
    assert posthoc_config("task_arithmetic", tmp_path, experts)["parameters"] == {"weight": 1.0, "lambda": 1 / 3}
    assert posthoc_config("ties", tmp_path, experts)["parameters"] == {"weight": 1.0, "density": 0.2, "lambda": 1.0}
    assert posthoc_config("ties", tmp_path, experts, {"density": 0.5})["parameters"]["density"] == 0.5
    stock = posthoc_config("model_stock", tmp_path, experts)  # no weight parameter: none is written
    assert stock["parameters"] == {} and stock["base_model"] == str(tmp_path)
