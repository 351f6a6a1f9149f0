"""RegMean (methods/regmean.py), its statistics (grams.py, `mergelab regmean-stats`) and the
engine's per-tensor [in, in] file contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergelab import merge
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.methods import METHODS

regmean = METHODS["regmean"]


def test_identity_grams_give_the_average():
    experts = [torch.randn(3, 4) for _ in range(3)]
    merged = regmean([e.clone() for e in experts], None, gram=[torch.eye(4)] * 3, alpha=0.9)
    assert torch.allclose(merged, torch.stack(experts).mean(0), atol=1e-6)


def test_tensors_without_grams_are_averaged():
    experts = [torch.randn(5), torch.randn(5)]
    assert torch.allclose(regmean([e.clone() for e in experts], None, gram=[None, None]), (experts[0] + experts[1]) / 2)


def test_hand_computed_two_by_two_with_alpha():
    """G̃_1 = [[2, .5], [.5, 2]], G̃_2 = [[1, 0], [0, 3]] at alpha 0.5:
    W = (ΣG̃)⁻¹ Σ G̃ W_iᵀ = [33/59, 38/59]."""
    gram = [torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])]
    merged = regmean([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], None, gram=gram, alpha=0.5)
    assert torch.allclose(merged, torch.tensor([[33 / 59, 38 / 59]]), atol=1e-6)


def test_alpha_zero_weighs_each_column_by_the_grams_diagonals():
    gram = [torch.tensor([[4.0, 9.0], [9.0, 1.0]]), torch.tensor([[1.0, -5.0], [-5.0, 3.0]])]
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    merged = regmean([a.clone(), b.clone()], None, gram=gram, alpha=0.0)
    expected = torch.stack([(4 * a[:, 0] + b[:, 0]) / 5, (a[:, 1] + 3 * b[:, 1]) / 4], 1)
    assert torch.allclose(merged, expected, atol=1e-6)


def test_linear_regression_toy_recovers_the_joint_least_squares_solution():
    """Each expert is the least-squares fit of its own data; RegMean (alpha 1) of the fits is the
    least-squares fit of all the data together (the paper's Eq. 2)."""
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(40 + 10 * i, 6, generator=generator, dtype=torch.float64) for i in range(3)]
    ys = [x @ torch.randn(6, 2, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(len(x), 2,
          generator=generator, dtype=torch.float64) for x in xs]
    fits = [torch.linalg.lstsq(x, y).solution.T for x, y in zip(xs, ys)]  # each [out=2, in=6]
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    merged = regmean([f.clone() for f in fits], None, gram=[x.T @ x for x in xs], alpha=1.0)
    assert torch.allclose(merged, joint, atol=1e-9)


def test_an_input_feature_no_expert_saw_takes_the_mean_column():
    gram = [torch.diag(torch.tensor([2.0, 0.0])), torch.diag(torch.tensor([1.0, 0.0]))]
    a, b = torch.randn(2, 2), torch.randn(2, 2)
    merged = regmean([a.clone(), b.clone()], None, gram=gram, alpha=0.9)
    assert torch.allclose(merged[:, 0], (2 * a[:, 0] + b[:, 0]) / 3, atol=1e-6)
    assert torch.allclose(merged[:, 1], (a[:, 1] + b[:, 1]) / 2, atol=1e-6)


def test_mixed_or_misshapen_grams_and_a_singular_system_are_refused():
    with pytest.raises(MergelabError, match="some models have a Gram"):
        regmean([torch.randn(2, 2), torch.randn(2, 2)], None, gram=[torch.eye(2), None])
    with pytest.raises(MergelabError, match="does not fit"):
        regmean([torch.randn(2, 3), torch.randn(2, 3)], None, gram=[torch.eye(2), torch.eye(2)])
    rank_one = torch.ones(2, 2)
    with pytest.raises(MergelabError, match="singular at alpha 1"):
        regmean([torch.randn(2, 2), torch.randn(2, 2)], None, gram=[rank_one, rank_one], alpha=1.0)


# -- statistics -------------------------------------------------------------------------------
def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


RECORDS = [{"input": "copy 1 2 =", "output": "1 2"}, {"input": "sort 3 1 2 =", "output": "1 2 3"},
           {"input": "reverse 4 5 =", "options": ["4 5", "5 4"], "answer": 1}, "copy 7 ="]


def test_regmean_stats_equal_xtx_of_a_hooked_forward(world, tmp_path, one_thread):
    """X^T X by hand: the inputs of two layers captured by a hook of our own on one padded batch,
    the padding rows dropped."""
    from mergelab.evaluate.decoder import pad, split_encode
    from mergelab.grams import regmean_stats
    from mergelab.loading import load_model

    data = write_records(tmp_path / "train.jsonl", RECORDS)
    out = regmean_stats(world["a"], data, tmp_path / "a.gram.safetensors", quiet=True)
    grams = load_file(out)

    model, tokenizer = load_model(world["a"])
    rows = []
    for record in RECORDS[:3]:
        output = record["output"] if "output" in record else record["options"][record["answer"]]
        prompt, answer = split_encode(tokenizer, record["input"], output)
        rows.append(prompt + answer + [tokenizer.eos_token_id])
    rows.append(tokenizer("copy 7 =")["input_ids"])
    input_ids, mask = pad(rows, tokenizer.pad_token_id)
    captured = {}
    layers = {"model.layers.0.self_attn.q_proj": None, "model.layers.1.mlp.down_proj": None}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: captured.__setitem__(name, args[0])) for name in layers]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    for name in layers:
        x = captured[name][mask.bool()].double()  # (non-padding tokens, in)
        assert torch.allclose(grams[f"{name}.weight"].double(), x.T @ x, rtol=1e-5, atol=1e-4), name
    assert "lm_head.weight" not in grams  # tied to the embeddings: averaged, no Gram
    assert len(grams) == 2 * 7  # q, k, v, o, gate, up, down per block
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["examples"] == "4" and int(metadata["tokens"]) == int(mask.sum())


def test_regmean_stats_refuses_bad_input_before_any_work(world, tmp_path):
    from mergelab.grams import regmean_stats

    data = write_records(tmp_path / "train.jsonl", RECORDS)
    with pytest.raises(MergelabError, match="record 1 has no 'input'"):
        regmean_stats(world["a"], write_records(tmp_path / "bad.jsonl", [{"question": "?"}]), tmp_path / "x")
    with pytest.raises(MergelabError, match="--examples must be a whole number"):
        regmean_stats(world["a"], data, tmp_path / "x", examples=0)
    (tmp_path / "exists.safetensors").write_bytes(b"")
    with pytest.raises(MergelabError, match="already exists"):
        regmean_stats(world["a"], data, tmp_path / "exists.safetensors")


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gram_files(tiny_world, tmp_path_factory):
    from mergelab.devices import torch_threads
    from mergelab.grams import regmean_stats

    root = tmp_path_factory.mktemp("grams")
    copy = write_records(root / "copy.jsonl", [{"input": f"copy {i} {j} =", "output": f"{i} {j}"}
                                                for i in range(5) for j in range(5)])
    sort = write_records(root / "sort.jsonl", [{"input": f"sort {i} {j} =", "output": " ".join(sorted(f"{i}{j}"))}
                                                for i in range(5) for j in range(5)])
    with torch_threads(1):
        return {"a": regmean_stats(tiny_world["a"], copy, root / "a.safetensors", quiet=True),
                "b": regmean_stats(tiny_world["b"], sort, root / "b.safetensors", quiet=True)}


def regmean_config(world, grams, **parameters) -> dict:
    return {"merge_method": "regmean", "parameters": parameters,
            "models": [{"model": world[k], "parameters": {"gram": str(grams[k])}} for k in ("a", "b")]}


def test_end_to_end_regmean_merge_loads_with_transformers(world, gram_files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge(regmean_config(world, gram_files, alpha=0.9), tmp_path / "merged", quiet=True)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    a = AutoModelForCausalLM.from_pretrained(world["a"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(world["b"]).state_dict()
    grams = [load_file(gram_files["a"]), load_file(gram_files["b"])]
    name = "model.layers.1.mlp.up_proj.weight"
    expected = regmean([a[name].clone(), b[name].clone()], None, gram=[g[name] for g in grams], alpha=0.9)
    assert torch.allclose(merged[name], expected, atol=1e-6)
    assert not torch.allclose(merged[name], (a[name] + b[name]) / 2, atol=1e-4)  # the Grams mattered
    for plain in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.allclose(merged[plain], (a[plain] + b[plain]) / 2, atol=1e-6)
    card = (out / "README.md").read_text()
    assert f"gram of `{world['a']}`: `{gram_files['a']}` (14 tensors" in card and "examples 25" in card


def test_gram_files_are_checked_against_the_models_before_merging(world, gram_files, tmp_path):
    grams = load_file(gram_files["a"])
    cases = {
        "wrong_shape": ({**grams, "model.layers.0.mlp.down_proj.weight": torch.eye(64)},
                        r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 64\), but model .* \(64, 128\), "
                        r"so it must be \(128, 128\)"),
        "unknown": ({**grams, "model.layers.9.mlp.up_proj.weight": torch.eye(64)},
                    "tensor 'model.layers.9.mlp.up_proj.weight' does not belong to a 2-D weight .* has no such tensor"),
        "norm": ({**grams, "model.norm.weight": torch.eye(64)}, "not a 2-D weight"),
        "fewer": ({k: v for k, v in grams.items() if "layers.1." not in k}, "has tensor 'model.layers.1."),
    }
    for label, (tensors, match) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, path)
        with pytest.raises(MergelabError, match=match):
            merge(regmean_config(world, {"a": path, "b": gram_files["b"]}), tmp_path / label, quiet=True)
        assert not (tmp_path / label).exists()
    missing = regmean_config(world, gram_files)
    del missing["models"][1]["parameters"]
    with pytest.raises(MergelabError, match="needs parameters.gram"):
        merge(missing, tmp_path / "missing", quiet=True)


def test_regmean_stats_command(world, tmp_path):
    data = write_records(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "a.safetensors"
    result = CliRunner().invoke(main, ["regmean-stats", world["a"], "--data", str(data), "--out", str(out),
                                       "--examples", "2", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "statistics written to" in result.output
    with safe_open(out, "pt") as handle:
        assert handle.metadata()["examples"] == "2"
    again = CliRunner().invoke(main, ["regmean-stats", world["a"], "--data", str(data), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_the_readme_regmean_commands_run(tiny_world, tmp_path, monkeypatch):
    """The README's `mergelab regmean-stats` line and its regmean YAML, on tiny local models."""
    import re
    import shlex
    import shutil

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Data-aware merging", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(mergelab regmean-stats .*?)\n```", section, flags=re.DOTALL)[1]
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL)[1])
    monkeypatch.chdir(tmp_path)
    for entry, source in zip(config["models"], ("a", "b")):
        shutil.copytree(tiny_world[source], entry["model"])
        skill = "copy" if "copy" in entry["model"] else "sort"
        data = Path("data") / skill / "train.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        write_records(data, [{"input": f"{skill} 3 1 =", "output": "1 3" if skill == "sort" else "3 1"}])
        args = shlex.split(command.replace("expert-copy", Path(entry["model"]).name).replace("copy", skill))[1:]
        result = CliRunner().invoke(main, args + ["--quiet", "--threads", "1"])
        assert result.exit_code == 0, result.output
        assert Path(entry["parameters"]["gram"]).is_file()
    assert (merge(config, "merged", quiet=True) / "model.safetensors").is_file()


def test_a_missing_or_corrupt_data_file_and_a_corrupt_gram_file_are_user_errors(world, tmp_path):
    from mergelab.grams import regmean_stats

    with pytest.raises(MergelabError, match=r"missing\.jsonl does not exist"):
        regmean_stats(world["a"], tmp_path / "missing.jsonl", tmp_path / "x.safetensors")
    (tmp_path / "corrupt.jsonl").write_text("{not json\n")
    with pytest.raises(MergelabError, match=r"corrupt\.jsonl, line 1.*not valid JSON"):
        regmean_stats(world["a"], tmp_path / "corrupt.jsonl", tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    entries = [{"model": world[k], "parameters": {"gram": str(tmp_path / "bad.safetensors")}} for k in ("a", "b")]
    with pytest.raises(MergelabError, match=r"bad\.safetensors is not a safetensors file"):
        merge({"merge_method": "regmean", "models": entries}, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()
