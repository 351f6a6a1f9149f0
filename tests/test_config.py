"""The merge config: mergekit's YAML, and one clear line for every way it can be wrong."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

import mergelab
from mergelab import MergelabError
from mergelab.cli import main
from mergelab.config import UNSUPPORTED_KEYS, MergeOptions, evaluate_setting, load_config

VALID = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}


def problem(config) -> str:
    """The message ``load_config`` refuses ``config`` with; it must be one line."""
    with pytest.raises(MergelabError) as info:
        load_config(config)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_valid_config_round_trips_through_yaml():
    config = load_config({**VALID, "parameters": {"weight": [{"filter": "mlp", "value": 2}, {"value": 1}]}})
    assert load_config(config.to_yaml()).model_dump() == config.model_dump()


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_KEYS))
def test_mergekit_keys_we_do_not_support_yet_are_named(key):
    message = problem({**VALID, key: "anything"})
    assert f"uses '{key}'" in message and "does not support yet" in message


def test_a_misspelt_top_level_key_gets_a_suggestion():
    message = problem({**VALID, "base_modle": "base"})
    assert message == "config: unknown top-level key 'base_modle'; did you mean 'base_model'?"


def test_an_unknown_top_level_key_lists_the_valid_ones():
    message = problem({**VALID, "nomalize": True})
    assert message.startswith("config: unknown top-level key 'nomalize'; valid keys: merge_method, models, ")


def test_a_misspelt_key_inside_a_model_names_its_path():
    config = {**VALID, "models": [{"model": "a"}, {"model": "b", "paramters": {"weight": 2}}]}
    assert problem(config) == "config: unknown key 'paramters' in models[1]; did you mean 'parameters'?"


def test_a_misspelt_filter_key_wins_over_the_union_noise():
    config = {**VALID, "parameters": {"weight": [{"filtr": "mlp", "value": 2}]}}
    assert problem(config) == "config: unknown key 'filtr' in parameters.weight[0]; did you mean 'filter'?"


def test_a_bad_parameter_value_names_its_path_and_the_accepted_forms():
    config = {**VALID, "models": [{"model": "a", "parameters": {"weight": {"x": 1}}}, {"model": "b"}]}
    message = problem(config)
    assert message.startswith('config: models[0].parameters.weight is {"x": 1}; a parameter value is a number')
    assert "list of {filter, value} entries" in message


@pytest.mark.parametrize("config, expected", [
    ({"models": [{"model": "a"}]}, "config: merge_method is required"),
    ({**VALID, "models": [{"modle": "a"}]}, "config: unknown key 'modle' in models[0]; did you mean 'model'? "
                                            "(and 1 more problem)"),
    ({**VALID, "models": ["a"]}, 'config: models[0] must be a mapping (key: value), got "a"'),
    ({**VALID, "dtype": 3}, "config: dtype: input should be a valid string, got 3"),
    ({**VALID, "parameters": {"t": [{"filter": "mlp"}]}}, "config: parameters.t[0].value is required"),
])
def test_validation_errors_are_one_line_with_the_field_path(config, expected):
    assert problem(config) == expected


def test_errors_of_a_config_file_name_the_file(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump({**VALID, "models": [{"model": "a", "parameters": {"wieght": 1}}, "b"]}))
    assert problem(path).startswith(f"{path}: models[1] must be a mapping")


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("merge_method: linear\nmodels: [{model: a}\n")
    assert problem(path).startswith(f"{path} is not valid YAML: expected ',' or ']'")
    assert "at line 3, column 1" in problem(path)


def test_the_cli_prints_a_config_error_as_one_error_line(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump({**VALID, "modules": {"text": {"models": []}}}))
    result = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {path} uses 'modules'") and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


# -- parameter values per tensor ------------------------------------------------------------------
def test_a_gradient_is_interpolated_from_the_first_layer_to_the_last():
    assert evaluate_setting([0.0, 1.0], "model.layers.3.mlp.weight", position=0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", position=0.75) == pytest.approx(0.5)


def test_the_first_matching_filter_wins_and_none_matches_gives_none():
    filtered = [{"filter": "mlp", "value": 1}, {"filter": "attn", "value": 2}]
    config = load_config({**VALID, "parameters": {"t": filtered}})
    setting = config.parameters["t"]
    assert evaluate_setting(setting, "layers.0.mlp.up", 0.0) == 1
    assert evaluate_setting(setting, "layers.0.self_attn.q", 0.0) == 2
    assert evaluate_setting(setting, "norm.weight", 0.0) is None


# -- merge options ----------------------------------------------------------------------------------
def test_merge_options_refuse_an_unknown_name_with_a_suggestion(tmp_path):
    with pytest.raises(MergelabError, match=r"unknown merge option 'thread'; did you mean 'threads'\? options are: "):
        mergelab.merge(VALID, tmp_path / "out", thread=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, match", [
    ({"threads": 2.5}, "merge option 'threads' must be an integer or a string, got 2.5"),  # "2" and "auto" are fine
    ({"quiet": 1}, "merge option 'quiet' must be true or false, got 1"),
    ({"seed": True}, "merge option 'seed' must be an integer, got True"),
    ({"shard_size": 1.5}, "merge option 'shard_size' must be a string or an integer, got 1.5"),
])
def test_merge_options_refuse_a_wrong_type(options, match):
    with pytest.raises(MergelabError, match=match):
        MergeOptions.from_kwargs(**options)


def test_every_merge_option_is_a_cli_option_with_its_help():
    from dataclasses import fields

    help_text = " ".join(CliRunner().invoke(main, ["merge", "--help"]).output.split())
    for spec in fields(MergeOptions):
        assert f"--{spec.name.replace('_', '-')}" in help_text
        assert " ".join(spec.metadata["help"].split()) in help_text
