"""`import mergelab`, `mergelab --help` and early user errors load neither transformers nor
(for help) torch: each is checked in a fresh interpreter, where sys.modules tells the truth."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run the click entry point in a fresh interpreter; print its exit code and which heavy modules it loaded.
CLI = """
import json, sys
from mergelab.cli import main
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"exit": code, "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}}))
"""


def fresh(code: str, cwd) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_mergelab_loads_neither_torch_nor_transformers(tmp_path):
    code = ("import json, sys, mergelab; "
            "print(json.dumps({'loaded': [m for m in ('torch', 'transformers') if m in sys.modules]}))")
    assert fresh(code, tmp_path)["loaded"] == []


def test_subpackages_load_on_first_use(tmp_path):
    code = ("import json, sys, mergelab; from mergelab.cocktail.options import LossOptions; "
            "f = mergelab.cocktail.fewshot_weights; "
            "print(json.dumps({'loaded': [m for m in ('torch', 'transformers') if m in sys.modules]}))")
    assert fresh(code, tmp_path)["loaded"] == ["torch"]  # transformers waits for the first model load


@pytest.mark.parametrize("args", [["--help"], ["merge", "--help"], ["cocktail", "weights", "--help"],
                                  ["eval", "--help"], ["methods", "--help"]])
def test_help_loads_neither_torch_nor_transformers(args, tmp_path):
    assert fresh(CLI.format(args=args), tmp_path) == {"exit": 0, "loaded": []}


def test_a_missing_merge_config_fails_before_torch_loads(tmp_path):
    assert fresh(CLI.format(args=["merge", "missing.yml", "out"]), tmp_path) == {"exit": 2, "loaded": []}


def test_an_early_cocktail_error_does_not_load_transformers(tmp_path):
    result = fresh(CLI.format(args=["cocktail", "weights", "--base", "missing", "--examples", "none.json"]), tmp_path)
    assert result["exit"] == 2 and "transformers" not in result["loaded"]
