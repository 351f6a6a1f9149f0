"""Every user error is a MergelabError that names the culprit, is caught before merging (or, if
found while streaming, leaves nothing behind), and reaches the CLI as `error: ...`, status 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelab
from mergelab import MergelabError
from mergelab.cli import main
from mergelab.lm import tiny_llama

LAST_TENSOR = "model.norm.weight"  # stored last, so a NaN here is found after other tensors were written


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """A path that does not exist must never turn into a Hub download attempt."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# -- helpers ---------------------------------------------------------------------------------
def write_config(path: Path, config: dict | str) -> Path:
    """Write a config (a dict as YAML, a str verbatim) and return its path."""
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def linear(*models: str, **parameters) -> dict:
    return {"merge_method": "linear", "models": [{"model": m} for m in models],
            "parameters": {"weight": 1.0, **parameters}}  # weight is required, as in mergekit


def with_base(method: str, base: str, *models: str, **parameters) -> dict:
    from mergelab.methods import METHODS

    weight = {"weight": 1.0} if METHODS[method].param("weight") else {}
    return {"merge_method": method, "base_model": base, "models": [{"model": m} for m in models],
            "parameters": {**weight, **parameters}}


def leftovers(out: Path) -> list[str]:
    """Hidden temp siblings (`.NAME.tmp-*`, `.NAME.old-*`) a merge may have left next to ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def expect_error(config, out: Path, match: str, **options) -> MergelabError:
    """Run a merge that must fail with ``match`` and leave neither output nor temp directory."""
    with pytest.raises(MergelabError, match=match) as info:
        mergelab.merge(config, out, quiet=True, **options)
    assert not out.exists()
    assert leftovers(out) == []
    return info.value


def damaged_copy(model: str, target: Path) -> Path:
    return Path(shutil.copytree(model, target))


def edit_tensors(model_dir: Path, edit) -> Path:
    """Rewrite ``model_dir/model.safetensors`` after ``edit(tensors)`` changed the dict in place."""
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return model_dir


def poisoned(model: str, target: Path, value: float, name: str = LAST_TENSOR) -> Path:
    def poison(tensors):
        tensors[name][3] = value

    return edit_tensors(damaged_copy(model, target), poison)


def esc(path) -> str:
    return re.escape(str(path))


# -- config files ------------------------------------------------------------------------------
def test_missing_config_file(tmp_path):
    expect_error(tmp_path / "nope.yml", tmp_path / "out", r"config file .*nope\.yml does not exist")


def test_empty_yaml_file(tmp_path):
    config = write_config(tmp_path / "empty.yml", "")
    expect_error(config, tmp_path / "out", r"empty\.yml is empty; it needs at least merge_method and models")


def test_malformed_yaml(tmp_path):
    config = write_config(tmp_path / "bad.yml", "merge_method: linear\nmodels: [{model: a}\n")
    expect_error(config, tmp_path / "out", r"bad\.yml is not valid YAML")


def test_yaml_that_is_a_list(tmp_path):
    config = write_config(tmp_path / "list.yml", "- merge_method: linear\n- models: []\n")
    expect_error(config, tmp_path / "out", r"list\.yml must be a YAML mapping .* not list")


def test_unknown_top_level_key(tmp_path, world):
    config = {**linear(world["a"], world["b"]), "nomalize": True}
    expect_error(config, tmp_path / "out", r"unknown (top-level )?key 'nomalize'")


def test_slices_config_past_the_last_layer(tmp_path, world):
    config = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": world["a"], "layer_range": [0, 3]}]}]}
    expect_error(config, tmp_path / "out", r"slices\[0\]\.sources\[0\]: layer_range \[0, 3\) of model .* goes past "
                                           r"its 2 layers; the last range it has is \[0, 2\)")


# -- methods, model counts and roles -----------------------------------------------------------
def test_unknown_method(tmp_path, world):
    config = {**linear(world["a"], world["b"]), "merge_method": "frankenmerge"}
    expect_error(config, tmp_path / "out", r"unknown merge_method 'frankenmerge'; choose one of: linear, ")


@pytest.mark.parametrize("with_base_model", [True, False], ids=["base_model", "no_base_model"])
def test_slerp_with_three_models(tmp_path, world, with_base_model):
    config = {"merge_method": "slerp", "models": [{"model": world[k]} for k in ("base", "a", "b")]}
    if with_base_model:
        config["base_model"] = world["base"]
    expect_error(config, tmp_path / "out", r"slerp merges exactly two models .*; got 3")


def test_model_stock_with_one_expert(tmp_path, world):
    config = with_base("model_stock", world["base"], world["a"])
    expect_error(config, tmp_path / "out", r"model_stock needs at least 2 models besides base_model; got 1")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_task_vector_methods_need_a_base_model(tmp_path, world, method):
    config = {"merge_method": method, "models": [{"model": world["a"]}, {"model": world["b"]}]}
    expect_error(config, tmp_path / "out", rf"{method} needs base_model .* add base_model")


# -- parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize("config, match", [
    pytest.param(lambda w: {**with_base("ties", w["base"], w["b"]),
                            "models": [{"model": w["a"], "parameters": {"density": 0}}, {"model": w["b"]}]},
                 r"parameter 'density' of model '.*/a' for tensor '.+' is 0, outside \(0, 1\]", id="ties-density-0"),
    pytest.param(lambda w: with_base("ties", w["base"], w["a"], w["b"], density=1.5),
                 r"parameter 'density' of model '.*/a' for tensor '.+' is 1\.5, outside \(0, 1\]",
                 id="ties-density-1.5"),
    pytest.param(lambda w: with_base("slerp", w["base"], w["a"], t=1.2),
                 r"parameter 't' for tensor '.+' is 1\.2, outside \[0, 1\]", id="slerp-t-1.2"),
    pytest.param(lambda w: {**linear(w["a"], w["b"], alpha=-0.1), "merge_method": "lm_cocktail"},
                 r"parameter 'alpha' for tensor '.+' is -0\.1, outside \[0, 1\]", id="lm_cocktail-alpha--0.1"),
])
def test_parameter_out_of_range(tmp_path, world, config, match):
    expect_error(config(world), tmp_path / "out", match + "; set it inside that range")


def test_linear_weights_summing_to_zero(tmp_path, world):
    config = {"merge_method": "linear", "parameters": {"normalize": True},
              "models": [{"model": world["a"], "parameters": {"weight": 1.0}},
                         {"model": world["b"], "parameters": {"weight": -1.0}}]}
    expect_error(config, tmp_path / "out", r"linear weights \[1\.0, -1\.0\] sum to zero for tensor '.+' "
                                           r"and normalize is on; .*set normalize: false")


def test_unknown_parameter_name(tmp_path, world):
    config = linear(world["a"], world["b"], densty=0.5)
    expect_error(config, tmp_path / "out", r"parameter 'densty' is not used by linear; its parameters are: ")


def test_global_only_parameter_given_per_model(tmp_path, world):
    config = {"merge_method": "task_arithmetic", "base_model": world["base"],
              "models": [{"model": world["a"], "parameters": {"lambda": 0.5}}, {"model": world["b"]}]}
    expect_error(config, tmp_path / "out",
                 r"parameter 'lambda' of model '.*/a' is not per-model; put it under the top-level parameters")


@pytest.mark.parametrize("key, value", [("out_dtype", "int8"), ("dtype", "foo")])
def test_bad_dtype(tmp_path, world, key, value):
    config = {**linear(world["a"], world["b"]), key: value}
    expect_error(config, tmp_path / "out", rf"^{key} '{value}' is not a floating-point dtype .* use one of float32")


# -- checkpoints -------------------------------------------------------------------------------
def test_missing_model_path(tmp_path, world):
    missing = str(tmp_path / "no-such-model")
    expect_error(linear(world["a"], missing), tmp_path / "out", rf"model '{esc(missing)}': .* does not exist; check")


def test_shape_mismatch(tmp_path, world):
    name = "model.layers.0.self_attn.q_proj.weight"
    broken = edit_tensors(damaged_copy(world["a"], tmp_path / "broken"),
                          lambda tensors: tensors.update({name: torch.zeros(64, 32)}))
    expect_error(linear(world["base"], str(broken)), tmp_path / "out",
                 rf"tensor '{re.escape(name)}' has shape \(64, 64\) in model '{esc(world['base'])}' "
                 rf"but \(64, 32\) in model '{esc(broken)}'")


def test_missing_tensor(tmp_path, world):
    broken = edit_tensors(damaged_copy(world["a"], tmp_path / "broken"), lambda tensors: tensors.pop(LAST_TENSOR))
    expect_error(linear(world["base"], str(broken)), tmp_path / "out",
                 rf"tensor '{LAST_TENSOR}' is in model '{esc(world['base'])}' but missing from model '{esc(broken)}'")


def test_vocab_size_mismatch(tmp_path, world):
    other = tmp_path / "vocab32"
    tiny_llama(vocab_size=32).save_pretrained(other)
    expect_error(linear(world["base"], str(other)), tmp_path / "out",
                 rf"vocab size mismatch: tensor 'model\.embed_tokens\.weight' has 18 rows in model "
                 rf"'{esc(world['base'])}' but 32 in model '{esc(other)}' .*set tokenizer_source: union")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_tensor(tmp_path, world, value):
    broken = poisoned(world["a"], tmp_path / "broken", value)
    expect_error(linear(world["base"], str(broken)), tmp_path / "out",
                 rf"model '{esc(broken)}': tensor '{LAST_TENSOR}' contains 1 NaN/Inf values")


@pytest.mark.parametrize("new_size, match", [
    (lambda size: size // 2, "is truncated: tensor '.+' ends at byte"),
    (lambda size: size - 1, "is truncated: tensor '.+' ends at byte"),
    (lambda size: 4, r"is not a safetensors file \(only 4 bytes\)"),
], ids=["half", "last-byte", "4-bytes"])
def test_truncated_safetensors(tmp_path, world, new_size, match):
    broken = damaged_copy(world["a"], tmp_path / "broken")
    file = broken / "model.safetensors"
    os.truncate(file, new_size(file.stat().st_size))
    expect_error(linear(world["base"], str(broken)), tmp_path / "out", rf"{esc(file)} {match}.*re-download")


def _garbage_file(raw: bytes) -> bytes:
    return b"this is not a safetensors file " * 8


def _garbage_header(raw: bytes) -> bytes:
    return raw[:8] + b"\xde\xad\xbe\xef{{{{" + raw[16:]


def _header_not_an_object(raw: bytes) -> bytes:
    length = int.from_bytes(raw[:8], "little")
    return raw[:8] + b"[" + b" " * (length - 2) + b"]" + raw[8 + length:]


@pytest.mark.parametrize("damage, match", [
    (_garbage_file, "is truncated or corrupt: its header claims"),
    (_garbage_header, "has a corrupt safetensors header"),
    (_header_not_an_object, "has a corrupt safetensors header"),
], ids=["garbage-file", "garbage-header", "header-not-an-object"])
def test_corrupt_safetensors_header(tmp_path, world, damage, match):
    broken = damaged_copy(world["a"], tmp_path / "broken")
    file = broken / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    expect_error(linear(world["base"], str(broken)), tmp_path / "out", rf"{esc(file)} {match}")


def test_index_naming_a_missing_shard(tmp_path, world):
    broken = damaged_copy(world["c"], tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (broken / shard).unlink()
    expect_error(linear(world["base"], str(broken)), tmp_path / "out",
                 rf"names shard '{re.escape(shard)}' \(for tensor '.+'\) but .* does not exist; re-download")


def _with_step(model: str, target: Path, step: int) -> Path:
    return edit_tensors(damaged_copy(model, target),
                        lambda tensors: tensors.update({"model.step": torch.tensor([step], dtype=torch.int64)}))


def test_integer_tensor_differing_between_models(tmp_path, world):
    base = _with_step(world["base"], tmp_path / "base", 1)
    other = _with_step(world["a"], tmp_path / "a", 2)
    expect_error(linear(str(base), str(other)), tmp_path / "out",
                 rf"integer tensor 'model\.step' differs between model '{esc(base)}' and model '{esc(other)}'")


def test_integer_tensor_in_one_model_only(tmp_path, world):
    other = _with_step(world["a"], tmp_path / "a", 2)
    expect_error(linear(world["base"], str(other)), tmp_path / "out",
                 rf"tensor 'model\.step' is in model '{esc(other)}' but missing from model '{esc(world['base'])}'")


# -- output directory --------------------------------------------------------------------------
def test_existing_output_dir_without_force(tmp_path, world):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MergelabError, match=rf"output directory {esc(out)} already exists; .* pass --force"):
        mergelab.merge(linear(world["a"], world["b"]), out, quiet=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(out) == []


@pytest.mark.parametrize("which", ["model-dir", "parent-of-model"])
def test_output_dir_that_holds_an_input(tmp_path, world, which):
    a = damaged_copy(world["a"], tmp_path / "models" / "a")
    out = a if which == "model-dir" else a.parent
    before = sorted(p.name for p in a.iterdir())
    with pytest.raises(MergelabError, match=rf"output directory {esc(out)} holds input model {esc(a)}; choose another"):
        mergelab.merge(linear(str(a), world["b"]), out, quiet=True, force=True)
    assert sorted(p.name for p in a.iterdir()) == before
    assert leftovers(out) == []


def test_failed_merge_leaves_no_output_and_no_temp_dir(tmp_path, world):
    broken = poisoned(world["a"], tmp_path / "broken", float("nan"))
    out = tmp_path / "nested" / "out"
    for threads in (1, 3):
        expect_error(linear(world["base"], str(broken)), out, "NaN/Inf", threads=threads)


def test_force_with_failing_merge_keeps_old_output(tmp_path, world):
    broken = poisoned(world["a"], tmp_path / "broken", float("nan"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MergelabError, match=rf"model '{esc(broken)}': tensor '{LAST_TENSOR}' contains 1 NaN/Inf"):
        mergelab.merge(linear(world["base"], str(broken)), out, quiet=True, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"
    assert leftovers(out) == []


def test_force_with_successful_merge_replaces_old_output(tmp_path, world):
    """The counterpart of the test above: --force does replace the directory when the merge works."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    mergelab.merge(linear(world["a"], world["b"]), out, quiet=True, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(out) == []


# -- the CLI -----------------------------------------------------------------------------------
def _cli_malformed_yaml(tmp_path, world):
    return "merge_method: linear\nmodels: [{model: a}\n", r"is not valid YAML"


def _cli_empty_yaml(tmp_path, world):
    return "", r"is empty"


def _cli_missing_model(tmp_path, world):
    return linear(world["a"], str(tmp_path / "no-such-model")), r"no-such-model' ?: .* does not exist"


def _cli_unknown_method(tmp_path, world):
    return {**linear(world["a"], world["b"]), "merge_method": "frankenmerge"}, r"unknown merge_method 'frankenmerge'"


def _cli_shape_mismatch(tmp_path, world):
    broken = edit_tensors(damaged_copy(world["a"], tmp_path / "broken"),
                          lambda tensors: tensors.update({LAST_TENSOR: torch.zeros(32)}))
    return linear(world["base"], str(broken)), rf"tensor '{LAST_TENSOR}' has shape \(64,\)"


def _cli_truncated(tmp_path, world):
    broken = damaged_copy(world["a"], tmp_path / "broken")
    os.truncate(broken / "model.safetensors", 1000)
    return linear(world["base"], str(broken)), r"model\.safetensors is truncated"


def _cli_bad_range(tmp_path, world):
    return with_base("slerp", world["base"], world["a"], t=1.2), r"parameter 't' .* is 1\.2, outside \[0, 1\]"


def _cli_nan_while_streaming(tmp_path, world):
    broken = poisoned(world["a"], tmp_path / "broken", float("nan"))
    return linear(world["base"], str(broken)), rf"tensor '{LAST_TENSOR}' contains 1 NaN/Inf values"


@pytest.mark.parametrize("scenario", [
    _cli_malformed_yaml, _cli_empty_yaml, _cli_missing_model, _cli_unknown_method, _cli_shape_mismatch,
    _cli_truncated, _cli_bad_range, _cli_nan_while_streaming,
], ids=lambda f: f.__name__.removeprefix("_cli_"))
def test_cli_prints_error_and_exits_2(tmp_path, world, scenario):
    config, match = scenario(tmp_path, world)
    path = write_config(tmp_path / "merge.yml", config)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(path), str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert re.search(match, result.stderr), result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert not out.exists() and leftovers(out) == []


def test_cli_missing_config_file(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "nope.yml"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: config file ") and "nope.yml does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_cli_existing_output_dir_needs_force(tmp_path, world):
    out = tmp_path / "out"
    out.mkdir()
    path = write_config(tmp_path / "merge.yml", linear(world["a"], world["b"]))
    result = CliRunner().invoke(main, ["merge", str(path), str(out), "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: output directory ") and "pass --force" in result.stderr
    assert "Traceback" not in result.output


def test_console_script_prints_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("mergelab")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mergelab.cli"]
    path = write_config(tmp_path / "bad.yml", "merge_method: linear\nmodels: [{model: a}\n")
    proc = subprocess.run([*command, "merge", str(path), str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "is not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()
