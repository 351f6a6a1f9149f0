"""Every merged directory carries a Hugging Face model card (README.md) that says what was merged."""

from __future__ import annotations

import yaml
from huggingface_hub import ModelCard

import mergelab


def ties_config(world) -> dict:
    return {"merge_method": "ties", "base_model": world["base"],
            "models": [{"model": world["a"], "parameters": {"weight": 1.0}},
                       {"model": world["b"], "parameters": {"weight": 0.5}}],
            "parameters": {"density": 0.5}}


def test_merged_directory_has_a_model_card_the_hub_can_read(tmp_path, world):
    (tmp_path / "marker").write_text("")
    out = mergelab.merge(ties_config(world), tmp_path / "out", quiet=True)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [world["base"], world["a"], world["b"]]
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergelab", "ties"]
    text = (out / "README.md").read_text()
    assert "TIES-Merging (arXiv:2306.01708)" in text and f"mergelab](https://pypi.org/project/mergelab/) " \
        f"{mergelab.__version__}" in text
    config = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == yaml.safe_load((out / "mergelab_config.yml").read_text())
    assert config["merge_method"] == "ties" and config["parameters"] == {"density": 0.5}


def test_no_model_card_option_and_an_inputs_own_readme_is_not_copied(tmp_path, world):
    import shutil

    source = shutil.copytree(world["a"], tmp_path / "a-with-card")
    (source / "README.md").write_text("# the expert's own card\n")
    config = {"merge_method": "linear", "models": [{"model": str(source)}, {"model": world["b"]}],
              "parameters": {"weight": 1.0}}
    out = mergelab.merge(config, tmp_path / "out", quiet=True)
    assert "the expert's own card" not in (out / "README.md").read_text()
    bare = mergelab.merge(config, tmp_path / "bare", quiet=True, no_model_card=True)
    assert not (bare / "README.md").exists()
