"""SFACallback inside transformers.Trainer: bit-identical to a hand-written loop, with and
without gradient accumulation; explicit anchors; the setups it refuses; DDP."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mergelab import MergelabError
from mergelab.continual import SFACallback, save_checkpoint, snapshot
from mergelab.lm import build_tokenizer, encode, make_examples, tiny_llama

STEPS, BATCH, LR = 6, 4, 0.05


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    tokenizer = build_tokenizer()
    return tokenizer, make_examples("reverse", STEPS * BATCH * 2, seed=4)


def previous_task_model() -> torch.nn.Module:
    """Stands in for the model after task A: the tiny Llama moved away from its init."""
    model = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def train_with_trainer(model, task, tmp_path, callbacks, accumulation=1, max_steps=STEPS):
    from transformers import Trainer, TrainingArguments

    tokenizer, examples = task
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential", report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=callbacks,
                      data_collator=lambda batch: encode(tokenizer, batch))
    trainer.train()
    return model


def train_by_hand(model, task, beta, interval, accumulation=1, total=STEPS):
    """SGD over the same micro-batches in the same order, the loss normalised by the answer
    tokens of the whole accumulated batch (as Trainer does), and SFA written out."""
    tokenizer, examples = task
    theta_o = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    micro = [encode(tokenizer, examples[i:i + BATCH]) for i in range(0, len(examples), BATCH)]
    for step in range(1, total + 1):
        group = micro[(step - 1) * accumulation: step * accumulation]
        answer_tokens = sum(batch["labels"][:, 1:].ne(-100).sum() for batch in group)
        for batch in group:
            model(**batch, num_items_in_batch=answer_tokens).loss.backward()
        optimizer.step()
        model.zero_grad()
        if step % interval == 0 or step == total:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_((1 - beta) * param + beta * theta_o[name])
    return model


def assert_identical(model_a, model_b):
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("accumulation, p, beta", [(1, 0.5, 0.5), (2, 0.25, 0.3)])
def test_callback_is_bit_identical_to_a_hand_written_loop(task, tmp_path, accumulation, p, beta):
    start = previous_task_model()
    callback = SFACallback(p=p, beta=beta)
    with_callback = train_with_trainer(copy.deepcopy(start), task, tmp_path, [callback], accumulation)
    interval = {0.5: 3, 0.25: 2}[p]  # ⌈p·6⌉
    reference = train_by_hand(copy.deepcopy(start), task, beta, interval, accumulation)
    assert callback.averaged_at == [s for s in range(1, STEPS + 1) if s % interval == 0 or s == STEPS]
    assert_identical(with_callback, reference)


def test_trainer_without_the_callback_matches_the_loop_without_averaging(task, tmp_path):
    """The reference loop really is Trainer's loop (so the test above checks SFA, not luck)."""
    start = previous_task_model()
    plain = train_with_trainer(copy.deepcopy(start), task, tmp_path, [], accumulation=2)
    reference = train_by_hand(copy.deepcopy(start), task, beta=0.0, interval=1, accumulation=2)
    assert_identical(plain, reference)


def test_an_explicit_anchor_from_a_checkpoint_dir(task, tmp_path):
    anchor_model = previous_task_model()
    anchor_dir = save_checkpoint(anchor_model, tmp_path / "task-a")
    start = tiny_llama(seed=3)  # not the anchor: the anchor comes from the directory
    callback = SFACallback(p=1.0, beta=1.0, anchor=anchor_dir, anchor_device="cpu")
    trained = train_with_trainer(start, task, tmp_path, [callback], max_steps=2)
    assert callback.averaged_at == [2]
    for name, value in snapshot(trained).items():  # β = 1 at the last step: exactly θ_o
        assert torch.equal(value, snapshot(anchor_model)[name]), name


def test_refuses_fsdp_and_deepspeed():
    model = tiny_llama()
    state = SimpleNamespace(global_step=0, max_steps=10)
    with pytest.raises(MergelabError, match="does not support FSDP"):
        SFACallback().on_train_begin(SimpleNamespace(fsdp="full_shard", deepspeed=None), state, None, model=model)
    with pytest.raises(MergelabError, match="does not support DeepSpeed"):
        SFACallback().on_train_begin(SimpleNamespace(fsdp="", deepspeed="ds.json"), state, None, model=model)


def test_resuming_needs_an_explicit_anchor():
    state = SimpleNamespace(global_step=40, max_steps=100)
    with pytest.raises(MergelabError, match="resumes at step 40.*SFACallback\\(anchor="):
        SFACallback().on_train_begin(SimpleNamespace(fsdp="", deepspeed=None), state, None, model=tiny_llama())


@pytest.mark.parametrize("kwargs, message", [({"p": 0}, "SFA p must be"), ({"beta": 2}, "SFA beta must be")])
def test_bad_parameters_fail_when_the_callback_is_built(kwargs, message):
    with pytest.raises(MergelabError, match=message):
        SFACallback(**kwargs)


DDP_SCRIPT = r'''
import json, os, sys, torch
torch.set_num_threads(1)
from transformers import Trainer, TrainingArguments
from mergelab.continual import SFACallback, snapshot
from mergelab.lm import build_tokenizer, encode, make_examples, tiny_llama

out = sys.argv[1]
tokenizer = build_tokenizer()
model = tiny_llama(seed=0)
examples = make_examples("reverse", 64, seed=int(os.environ["RANK"]))  # each rank its own data
args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=0.05, optim="sgd",
                         lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
                         use_cpu=True, ddp_backend="gloo", remove_unused_columns=False, disable_tqdm=True)
callback = SFACallback(p=0.5, beta=0.5)
Trainer(model=model, args=args, train_dataset=examples, callbacks=[callback],
        data_collator=lambda b: encode(tokenizer, b)).train()
torch.save(snapshot(model), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
json.dump(callback.averaged_at, open(os.path.join(out, f"steps{os.environ['RANK']}.json"), "w"))
'''


@pytest.mark.slow
def test_ddp_ranks_average_identically(tmp_path):
    """Two CPU processes (gloo) under torchrun: each rank averages at the same steps and the
    replicas stay identical."""
    script = tmp_path / "ddp_sfa.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (tmp_path / "steps0.json").read_text() == (tmp_path / "steps1.json").read_text() == "[2, 4]"
    assert not torch.equal(rank0["model.norm.weight"], snapshot(tiny_llama(seed=0))["model.norm.weight"])
