"""The README's Adapters section runs as written, in order, on tiny local models."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergelab.cli import main
from mergelab.lm import make_examples

from test_adapters import lora_world  # noqa: F401  (the module-scoped fixture)
from test_adapters_extract import finetunes  # noqa: F401

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def section_blocks() -> list[tuple[str, str]]:
    section = README.split("## Adapters (LoRA / PEFT)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


@pytest.mark.slow
def test_readme_adapter_section_runs(lora_world, finetunes, tmp_path, monkeypatch):  # noqa: F811
    models = tmp_path / "models"
    shutil.copytree(lora_world["llama"], models / "base")  # tiny_llama(seed=0), as finetunes' base
    shutil.copytree(finetunes["llama_ft"], models / "expert-copy")
    sort = Path(shutil.copytree(lora_world["sort"], tmp_path / "adapters" / "sort"))
    config = json.loads((sort / "adapter_config.json").read_text())
    (sort / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "models/base"}))
    (tmp_path / "five.jsonl").write_text("".join(json.dumps(e) + "\n" for e in make_examples("sort", 5, seed=0)))
    monkeypatch.chdir(tmp_path)
    blocks = section_blocks()
    yamls = iter(["lora-merge.yml", "adapters.yml"])
    ran = []
    for language, text in blocks:
        if language == "yaml":
            Path(next(yamls)).write_text(text)
        elif language == "bash":
            for command in text.replace("\\\n", " ").strip().splitlines():
                args = shlex.split(command)
                assert args[0] == "mergelab"
                result = CliRunner().invoke(main, args[1:])
                assert result.exit_code == 0, (command, result.output)
                ran.append(args[1])
        elif language == "py":
            exec(compile(text, "README.md", "exec"), {})
    assert ran == ["adapters", "merge", "inspect", "adapters", "cocktail"]
    for adapter in ("adapters/copy", "both", "cocktail-lora", "adapters/sort-sfa"):
        assert (Path(adapter) / "adapter_config.json").is_file(), adapter
    assert (Path("merged-lora") / "model.safetensors").is_file()
