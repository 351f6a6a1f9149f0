"""SFA on a PEFT LoRA model: only the adapter's trainable weights are averaged and copied; inside
transformers.Trainer it is bit-identical to a hand-written loop, as for full models."""

from __future__ import annotations

import copy

import pytest
import torch

from mergelab.continual import SFA, SFACallback
from mergelab.errors import MergelabError
from mergelab.lm import build_tokenizer, encode, make_examples, tiny_llama

from test_continual_callback import BATCH, LR, STEPS, train_with_trainer

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return build_tokenizer(), make_examples("reverse", STEPS * BATCH * 2, seed=4)


def lora_model(seed: int = 0):
    """A tiny Llama with a LoRA on q/v and a trainable norm, B moved off zero (as after a previous task)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules=["q_proj", "v_proj"],
                                                                    modules_to_save=["model.norm"]))
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def train_by_hand(model, task, beta, interval):
    """SGD on the adapter's weights over the same batches, SFA on those weights written out."""
    tokenizer, examples = task
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    theta_o = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=LR)
    model.train()
    for step in range(1, STEPS + 1):
        batch = encode(tokenizer, examples[(step - 1) * BATCH: step * BATCH])
        model(**batch, num_items_in_batch=batch["labels"][:, 1:].ne(-100).sum()).loss.backward()
        optimizer.step()
        model.zero_grad()
        if step % interval == 0 or step == STEPS:
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_((1 - beta) * param + beta * theta_o[name])
    return model


def test_callback_on_a_lora_model_is_bit_identical_to_a_hand_written_loop(task, tmp_path):
    start = lora_model()
    frozen = {n: p.detach().clone() for n, p in start.named_parameters() if not p.requires_grad}
    callback = SFACallback(p=0.5, beta=0.5)
    with_callback = train_with_trainer(copy.deepcopy(start), task, tmp_path, [callback])
    reference = train_by_hand(copy.deepcopy(start), task, beta=0.5, interval=3)
    assert callback.averaged_at == [3, 6]
    for (name, a), b in zip(with_callback.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    # the frozen base is untouched, the adapter moved
    for name, param in with_callback.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(with_callback.parameters(), start.parameters()))


def test_anchor_is_one_copy_of_the_adapter(tmp_path):
    model = lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    sfa = SFA(model, total_steps=4, p=0.5, beta=0.5, model=model)
    assert sfa.anchor_bytes() == sum(p.numel() * p.element_size() for p in trainable)
    assert sfa.anchor_bytes() < sum(p.numel() * p.element_size() for p in model.parameters()) / 10


def test_anchor_from_a_saved_adapter_directory(tmp_path):
    anchor = lora_model(seed=1)
    anchor.save_pretrained(tmp_path / "task-a")
    model = lora_model(seed=2)
    sfa = SFA(tmp_path / "task-a", total_steps=1, p=1.0, beta=1.0, model=model)
    sfa.maybe_average(model, 1)  # β = 1: exactly the anchor's adapter
    for (name, a), b in zip(model.named_parameters(), anchor.parameters()):
        assert torch.equal(a, b), name


def test_mismatched_anchors_are_refused(tmp_path):
    model = lora_model()
    with pytest.raises(MergelabError, match="the SFA anchor is a PEFT model but the model being trained is not"):
        SFA(model, total_steps=2, model=tiny_llama(seed=0))
    with pytest.raises(MergelabError, match="SFA anchor is a plain module"):
        SFA(tiny_llama(seed=0), total_steps=2, model=model)
    other = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(MergelabError, match="lacks adapter tensor"):
        SFA(other.state_dict(), total_steps=2, model=model)
