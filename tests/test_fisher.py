"""The diagonal Fisher helper: per-example squared gradients, saved under checkpoint names."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.demo.tiny import tiny_llama
from mergelab.fisher import fisher_diagonal, read_texts


def test_fisher_is_the_mean_of_per_example_squared_gradients():
    model = tiny_llama(seed=1)
    batches = [{"input_ids": torch.tensor([[1, 5, 6, 2]])}, {"input_ids": torch.tensor([[1, 7, 8, 9, 2]])}]
    fisher = fisher_diagonal(model, batches)
    expected = torch.zeros_like(model.model.norm.weight)
    for batch in batches:
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        expected += model.model.norm.weight.grad.square() / len(batches)
    assert torch.allclose(fisher["model.norm.weight"], expected, rtol=1e-5, atol=1e-12)
    # tied head and embeddings share one Fisher, under both names
    assert torch.equal(fisher["lm_head.weight"], fisher["model.embed_tokens.weight"])
    assert all((f >= 0).all() for f in fisher.values())


def test_fisher_cli_writes_a_file_with_the_checkpoint_names(world, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"input": "copy 1 2 =", "output": "1 2"}) for _ in range(3)))
    out = tmp_path / "f.safetensors"
    result = CliRunner().invoke(main, ["fisher", world["a"], "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    fisher = load_file(out)
    assert "model.layers.0.self_attn.q_proj.weight" in fisher
    assert CliRunner().invoke(main, ["fisher", world["a"], "--data", str(data), "--out", str(out)]).exit_code == 2


@pytest.mark.parametrize("content,match", [("", "is empty"), ("[1, 2]", "item 0"), ("{bad", "d.json")])
def test_bad_data_files_are_refused(tmp_path, content, match):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(MergelabError, match=match):
        read_texts(path)
