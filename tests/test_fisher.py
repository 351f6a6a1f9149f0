"""The diagonal Fisher helper: per-example squared gradients, saved under checkpoint names."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import read_only_dir
from safetensors.torch import load_file

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.fisher import estimate_fisher, fisher_diagonal, read_texts
from mergelab.lm import build_tokenizer, tiny_llama


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


# -- user errors: one line (and a hint), exit 2, found before the estimate, nothing left behind ---
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".venv" / "bin" / "mergelab"
READ_ONLY = (read_only_dir() or Path("/nonexistent")) / "mergelab.fisher.safetensors"


def without_tokenizer(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        if "token" not in item.name and item.name != "special_tokens_map.json":
            shutil.copy(item, target / item.name)
    return target


def pickled_bin(target: Path) -> Path:
    """A .bin checkpoint that also pickles a Python object, which torch.load(weights_only=True) refuses."""
    model = tiny_llama(seed=0)
    target.mkdir()
    model.config.save_pretrained(target)
    build_tokenizer().save_pretrained(target)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save({**state, "training_args": argparse.Namespace(lr=0.1)}, target / "pytorch_model.bin")
    return target


@pytest.fixture
def inputs(tiny_world, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input": "copy 1 2 =", "output": "1 2"}) + "\n")
    (tmp_path / "taken.safetensors").write_bytes(b"earlier results")
    return {"model": tiny_world["a"], "data": data, "pickled": pickled_bin(tmp_path / "pickled"), "tmp": tmp_path,
            "no_tokenizer": without_tokenizer(tiny_world["a"], tmp_path / "bare")}


# name: (model, --out, extra options, what the one error line says)
ERRORS = {
    "no tokenizer": ("no_tokenizer", "f.safetensors", [],
                     r"bare has no tokenizer \(none of tokenizer.json.*\n  hint: pass --tokenizer PATH"),
    "existing out": ("model", "taken.safetensors", [], r"taken.safetensors already exists; .*--force"),
    "out is a directory": ("model", "bare", [], r"Fisher file .*bare is a directory; give a file name"),
    "read-only out": ("model", READ_ONLY, [], r"cannot write .*mergelab.fisher.safetensors: .* is not writable"),
    "pickled .bin": ("pickled", "f.safetensors", [], r"pytorch_model.bin is not a plain tensor checkpoint .*convert it "
                                                     r"to safetensors"),
    "bad --samples": ("model", "f.safetensors", ["--samples", "0"], r"--samples must be a whole number of at least 1"),
}


def _arguments(inputs, case):
    model, out, extra, _ = ERRORS[case]
    out = out if isinstance(out, Path) else inputs["tmp"] / out
    return inputs[model], out, extra


def _skip_without_read_only(case):
    if case == "read-only out" and read_only_dir() is None:
        pytest.skip("no read-only file system here")


def _listing(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("case", ERRORS)
def test_fisher_user_errors_through_the_api_and_the_cli(inputs, case, monkeypatch):
    _skip_without_read_only(case)
    model, out, extra = _arguments(inputs, case)
    message = ERRORS[case][3]
    monkeypatch.setattr("mergelab.fisher.fisher_diagonal", lambda *a, **k: pytest.fail("estimated before the check"))
    before = _listing(inputs["tmp"])
    options = {"max_samples": int(extra[1])} if extra else {}
    with pytest.raises(MergelabError, match=message):
        estimate_fisher(model, read_texts(inputs["data"]), out, **options)
    result = CliRunner().invoke(main, ["fisher", str(model), "--data", str(inputs["data"]), "--out", str(out), *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.match(r"error: [^\n]*" + message, result.stderr) and "weights_only=False" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # the line, and at most an indented hint
    assert _listing(inputs["tmp"]) == before  # nothing left behind, the earlier file untouched


@pytest.mark.slow
def test_fisher_user_errors_through_the_console_script(inputs):
    for case in ERRORS:
        if case == "read-only out" and read_only_dir() is None:
            continue
        model, out, extra = _arguments(inputs, case)
        command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mergelab.cli"]
        done = subprocess.run([*command, "fisher", str(model), "--data", str(inputs["data"]), "--out", str(out),
                               *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (case, done.stderr)
        assert re.match(r"error: [^\n]*" + ERRORS[case][3], done.stderr) and "Traceback" not in done.stderr, case


def test_another_tokenizer_serves_a_model_saved_without_one(inputs):
    out = inputs["tmp"] / "f.safetensors"
    result = CliRunner().invoke(main, ["fisher", str(inputs["no_tokenizer"]), "--data", str(inputs["data"]), "--out",
                                       str(out), "--tokenizer", str(inputs["model"])])
    assert result.exit_code == 0, result.output
    assert "model.norm.weight" in load_file(out)
    assert not [p for p in inputs["tmp"].iterdir() if p.name.startswith(".")]  # no partial file left
