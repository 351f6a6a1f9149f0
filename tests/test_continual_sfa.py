"""SFA's plain-loop API: the schedule, the formula, and bit-identical weights against a
hand-written reference loop (soup-to-go Algorithm 1, Eq. 4–5)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from mergelab import MergelabError
from mergelab.continual import SFA, averaging_interval, l2_distance, save_checkpoint, snapshot
from mergelab.lm import build_tokenizer, encode, make_examples, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(seed: int = 0) -> torch.nn.Module:
    """Linear + BatchNorm: float parameters, float buffers and an integer buffer."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def trained_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in other.state_dict().values():
            if tensor.dtype.is_floating_point:
                tensor.add_(torch.randn(tensor.shape, generator=generator))
    return other


# -- the schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p, total, interval", [(1.0, 10, 10), (0.5, 10, 5), (0.25, 10, 3), (0.1, 100, 10),
                                                (0.7, 10, 7), (0.3, 10, 3), (0.01, 10, 1), (0.25, 1, 1)])
def test_interval_is_ceil_p_times_t(p, total, interval):
    assert averaging_interval(p, total) == interval


def test_averages_every_ceil_pt_steps_and_at_the_last_step():
    sfa = SFA(small_net().state_dict(), total_steps=10, p=0.25)
    assert [step for step in range(1, 11) if sfa.should_average(step)] == [3, 6, 9, 10]
    once = SFA(small_net().state_dict(), total_steps=10, p=1.0)
    assert [step for step in range(1, 11) if once.should_average(step)] == [10]


def test_maybe_average_returns_whether_it_averaged_and_records_the_steps():
    model = small_net()
    sfa = SFA(trained_copy(model, 1).state_dict(), total_steps=4, p=0.5)
    assert [sfa.maybe_average(model, step) for step in range(1, 5)] == [False, True, False, True]
    assert sfa.averaged_at == [2, 4]


# -- the formula ----------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_every_float_entry_becomes_the_weighted_average_and_integer_buffers_stay(beta):
    model = small_net()
    model.train()(torch.randn(8, 4))  # moves BatchNorm's running stats and num_batches_tracked
    anchor_model = trained_copy(model, 1)
    anchor_model[1].num_batches_tracked.fill_(99)
    before = copy.deepcopy(model.state_dict())
    SFA(anchor_model.state_dict(), total_steps=1, beta=beta).average(model)
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            expected = (1 - beta) * before[name] + beta * anchor_model.state_dict()[name]
            assert torch.equal(value, expected), name
        else:
            assert torch.equal(value, before[name]), f"integer buffer {name} must be left alone"


def test_tied_weights_are_averaged_once():
    model = tiny_llama(seed=0)  # lm_head.weight is model.embed_tokens.weight
    anchor = tiny_llama(seed=1)
    embedding = model.model.embed_tokens.weight.detach().clone()
    SFA(anchor.state_dict(), total_steps=1, beta=0.5).average(model)
    expected = 0.5 * embedding + 0.5 * anchor.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_anchor_is_a_private_copy():
    model = small_net()
    before = model[0].weight.detach().clone()
    sfa = SFA(model.state_dict(), total_steps=1)  # views of the live weights
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(sfa.anchor["0.weight"], before)


def test_anchor_may_live_on_cpu_and_be_a_module_or_a_checkpoint_dir(tmp_path):
    model, anchor_model = small_net(), trained_copy(small_net(), 1)
    expected = copy.deepcopy(model)
    SFA(anchor_model, 1, anchor_device="cpu").average(expected)
    from_dir = copy.deepcopy(model)
    sfa = SFA(save_checkpoint(anchor_model, tmp_path / "anchor"), 1, model=from_dir)
    sfa.average(from_dir)
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), from_dir.state_dict().values()))
    assert all(t.device.type == "cpu" for t in sfa.anchor.values())


def test_a_wrapped_model_is_averaged_through_its_wrapper():
    model, anchor = small_net(), trained_copy(small_net(), 1)
    reference = copy.deepcopy(model)
    SFA(anchor.state_dict(), 1).average(reference)
    SFA(anchor.state_dict(), 1).average(torch.nn.DataParallel(model))  # keys gain 'module.'
    assert torch.equal(model[0].weight, reference[0].weight)


def test_half_precision_weights_are_averaged_in_float32():
    model = small_net().to(torch.bfloat16)
    anchor = trained_copy(small_net(), 1).to(torch.bfloat16)
    before = model[0].weight.detach().float()
    SFA(anchor.state_dict(), 1, beta=0.3).average(model)
    expected = (0.7 * before + 0.3 * anchor[0].weight.float()).to(torch.bfloat16)
    assert torch.equal(model[0].weight, expected)


def test_l2_distance_by_hand():
    state_a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0]), "steps": torch.tensor(3)}
    state_b = {"w": torch.tensor([4.0, 6.0]), "b": torch.tensor([0.0]), "steps": torch.tensor(7)}
    assert l2_distance(state_a, state_b) == 5.0


# -- bit-identical to a hand-written reference loop ------------------------------------------------
def run_loop(model, batches, steps, lr, average_step):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(1, steps + 1):
        model(**batches[step - 1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        average_step(model, step)
    return model


@pytest.mark.parametrize("p, beta", [(0.25, 0.5), (0.5, 0.3), (1.0, 0.5)])
def test_plain_api_is_bit_identical_to_a_hand_written_loop(p, beta):
    tokenizer = build_tokenizer()
    examples = make_examples("reverse", 64, seed=3)
    rng = random.Random(0)
    steps = 8
    batches = [encode(tokenizer, rng.sample(examples, 8)) for _ in range(steps)]
    start = tiny_llama(seed=0)
    theta_o = snapshot(trained_copy(start, 5))  # the previous task's model

    with_api = copy.deepcopy(start)
    sfa = SFA(theta_o, total_steps=steps, p=p, beta=beta, model=with_api)
    run_loop(with_api, batches, steps, 1e-2, sfa.maybe_average)

    interval = -(-int(p * 100) * steps // 100)  # ⌈p·T⌉ for these p, in integers

    def by_hand(model, step):
        if step % interval == 0 or step == steps:
            with torch.no_grad():
                for name, param in model.named_parameters():  # the tied embedding appears once
                    param.copy_((1 - beta) * param + beta * theta_o[name])

    reference = run_loop(copy.deepcopy(start), batches, steps, 1e-2, by_hand)
    assert sfa.averaged_at == [s for s in range(1, steps + 1) if s % interval == 0 or s == steps]
    for (name, value), expected in zip(with_api.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name
    assert not torch.equal(with_api.model.norm.weight, start.model.norm.weight)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_p_outside_zero_one(p):
    with pytest.raises(MergelabError, match=r"SFA p must be"):
        SFA(small_net().state_dict(), 10, p=p)


@pytest.mark.parametrize("beta", [-0.01, 1.01, float("nan")])
def test_beta_outside_zero_one(beta):
    with pytest.raises(MergelabError, match=r"SFA beta must be in \[0, 1\].*weight on the previous task"):
        SFA(small_net().state_dict(), 10, beta=beta)


@pytest.mark.parametrize("total", [0, -3, 2.5, None])
def test_total_steps_below_one(total):
    with pytest.raises(MergelabError, match="total_steps must be an integer of at least 1"):
        SFA(small_net().state_dict(), total)


def test_step_zero_is_refused():
    with pytest.raises(MergelabError, match="counted from 1"):
        SFA(small_net().state_dict(), 10).maybe_average(small_net(), 0)


def test_anchor_missing_a_tensor():
    anchor = small_net().state_dict()
    del anchor["2.bias"]
    with pytest.raises(MergelabError, match="anchor lacks tensor '2.bias'"):
        SFA(anchor, 10, model=small_net())


def test_anchor_with_a_tensor_the_model_lacks():
    anchor = {**small_net().state_dict(), "extra.weight": torch.zeros(2)}
    with pytest.raises(MergelabError, match="anchor has tensor 'extra.weight' that the model does not"):
        SFA(anchor, 10).maybe_average(small_net(), 10)  # checked at the first averaging too


def test_anchor_from_a_ddp_state_dict_names_the_prefix():
    anchor = {f"module.{k}": v for k, v in small_net().state_dict().items()}
    with pytest.raises(MergelabError, match="strip the 'module.' prefix"):
        SFA(anchor, 10, model=small_net())


def test_anchor_shape_mismatch():
    anchor = small_net().state_dict()
    anchor["0.weight"] = torch.zeros(3, 5)
    with pytest.raises(MergelabError, match=r"tensor '0.weight' has shape \(3, 5\) but the model's has \(3, 4\)"):
        SFA(anchor, 10, model=small_net())


def test_anchor_of_the_wrong_type():
    with pytest.raises(MergelabError, match="state dict, a module, or a checkpoint path"):
        SFA(42, 10)
