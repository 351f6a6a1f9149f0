"""`mergelab demo`: where it may write is checked before the world is built, and a bad --out
is one `error:` line with exit 2 (API, CLI and the console script), with nothing left behind.
(The quick demo end to end runs in tests/test_cli.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import read_only_dir

from mergelab import MergelabError
from mergelab.cli import main
from mergelab.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".venv" / "bin" / "mergelab"
def out_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    existing_file = tmp_path / "report.txt"
    existing_file.write_text("not a directory")
    cases = {"an existing file": (existing_file, r"output path .*report.txt exists and is not a directory")}
    if read_only_dir() is not None:
        cases["a read-only place"] = (read_only_dir() / "mergelab-demo",
                                      r"cannot write .*mergelab-demo: .* is not writable")
    return cases


def listing(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("case", ["an existing file", "a read-only place"])
def test_a_bad_out_is_refused_before_the_world_is_built(tmp_path, monkeypatch, case):
    cases = out_paths(tmp_path)
    if case not in cases:
        pytest.skip("no read-only file system here")
    out, message = cases[case]
    monkeypatch.setattr("mergelab.demo.world.build_world", lambda *a, **k: pytest.fail("built before the check"))
    before = listing(tmp_path)
    with pytest.raises(MergelabError, match=message):
        run_demo(out, quiet=True, cache=tmp_path / "cache")
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert listing(tmp_path) == before


@pytest.mark.slow
def test_a_bad_out_through_the_console_script(tmp_path):
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mergelab.cli"]
    for out, message in out_paths(tmp_path).values():
        done = subprocess.run([*command, "demo", "--out", str(out), "--quiet"], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_merge_equal_to_a_world_model_gets_its_recorded_scores_without_being_scored(tmp_path, monkeypatch):
    import shutil

    from conftest import perturbed, save_model

    from mergelab.demo.studies import score_all, weights_digest
    from mergelab.demo.world import World
    from mergelab.lm import tiny_llama

    base = tiny_llama(seed=0)
    root = tmp_path / "world"
    save_model(base, root / "models" / "base")
    shutil.copytree(root / "models" / "base", tmp_path / "copy")
    save_model(perturbed(base, seed=1), tmp_path / "other")
    assert weights_digest(tmp_path / "copy") == weights_digest(root / "models" / "base")
    assert weights_digest(tmp_path / "other") != weights_digest(root / "models" / "base")

    recorded = {"copy": 0.25, "add": 0.5}  # what the world's build measured for its base
    world = World(root, None, scores={"base": recorded})
    scored = []
    monkeypatch.setattr("mergelab.demo.studies.evaluate_models", lambda dirs, *a, **k: scored.append(dirs) or [])
    monkeypatch.setattr("mergelab.demo.studies.test_tasks", lambda path: ())
    assert score_all(tmp_path / "copy", world) == recorded and not scored
    score_all(tmp_path / "other", world)
    assert scored == [[tmp_path / "other"]]
