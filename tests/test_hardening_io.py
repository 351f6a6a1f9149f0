"""Hostile checkpoint files and faults around the output directory (issue 10).

Each class is tested through the API, the CLI (click's runner) and, where a process boundary
matters (signals, kill -9, races, resource limits), a real ``mergelab`` console-script process.
"""

from __future__ import annotations

from collections import Counter
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelab
from mergelab import MergelabError
from mergelab.cli import main
from mergelab.io import CheckpointReader, read_safetensors_header
from mergelab.outdir import _temp_prefix, remove_stale_temporaries

from conftest import read_only_dir

SCRIPT = Path(sys.executable).with_name("mergelab")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mergelab.cli"]


# -- helpers ---------------------------------------------------------------------------------
def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """Write a safetensors file with exactly this header and data (no checks)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def two_floats(first: list[int], second: list[int], data_len: int = 16, **extra) -> dict:
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": first},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": second}, **extra}


def linear_config(tmp_path: Path, *models, name: str = "merge.yml") -> Path:
    config = {"merge_method": "linear", "models": [{"model": str(m)} for m in models], "parameters": {"weight": 1.0}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.stderr


def console(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


# -- 1. hostile safetensors headers ----------------------------------------------------------
HOSTILE_HEADERS = {
    "overlap": (two_floats([0, 8], [4, 12]), 12, "share bytes"),
    "same range": (two_floats([0, 8], [0, 8]), 8, "share bytes"),
    "negative start": (two_floats([-8, 0], [0, 8]), 8, "byte range|unreadable"),
    "gap": (two_floats([0, 8], [12, 20]), 20, "belong to no tensor"),
    "trailing bytes": (two_floats([0, 8], [8, 16]), 24, "cover 16"),
    "end before start": (two_floats([8, 0], [0, 8]), 8, "byte range"),
    "float offset": (two_floats([0.0, 8], [8, 16]), 16, "unreadable header entry"),
    "bool offset": (two_floats([False, 8], [8, 16]), 16, "unreadable header entry"),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, 8, "negative dimension"),
    "numel overflows": ({"a": {"dtype": "U8", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, 8, "overflows"),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, "unreadable header"),
    "entry not an object": ({"a": [1, 2]}, 8, "unreadable header entry"),
    "extra field": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, 8, "unreadable"),
    "metadata not an object": ({"__metadata__": 3, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                               8, "__metadata__"),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_hostile_header_is_refused_before_any_read(tmp_path, case):
    header, data_len, match = HOSTILE_HEADERS[case]
    path = raw_safetensors(tmp_path / "model.safetensors", header, bytes(range(data_len)))
    with pytest.raises(MergelabError, match=match):
        read_safetensors_header(path)


def test_duplicate_tensor_names_are_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    raw = ('{"a": %s, "a": %s}' % (entry, entry)).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(MergelabError, match="'a' appears twice"):
        read_safetensors_header(path)


def test_overlapping_tensors_never_merge_through_the_cli_or_the_console_script(tmp_path, world):
    """The dangerous case of the issue: before, two overlapping tensors merged with exit 0."""
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    header, data, offset = {}, b"", 0
    with CheckpointReader(world["a"]) as reader:
        names = list(reader.tensors)
        for name in names:
            tensor = reader.get(name)
            raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            header[name] = {"dtype": {torch.float32: "F32"}[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + len(raw)]}
            data += raw
            offset += len(raw)
    # The last tensor now points at the bytes of the one before it (same size).
    sizes = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names}
    twin = next(n for n in names[-2::-1] if sizes[n] == sizes[names[-1]])
    header[names[-1]]["data_offsets"] = header[twin]["data_offsets"]
    raw_safetensors(hostile / "model.safetensors", header, data[: offset - sizes[names[-1]]])
    (hostile / "config.json").write_text(Path(world["a"], "config.json").read_text())
    config = linear_config(tmp_path, world["a"], hostile)
    out = tmp_path / "out"

    with pytest.raises(MergelabError, match="share bytes"):
        mergelab.merge(config, out, quiet=True)
    code, stderr = cli("merge", config, out, "--quiet")
    assert code == 2 and stderr.startswith("error: ") and "share bytes" in stderr
    proc = console("merge", config, out, "--quiet")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "share bytes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_index_may_not_name_a_shard_outside_the_model_directory(tmp_path, world):
    victim = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.ones(2)}, victim)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(MergelabError, match="not a file name"):
        CheckpointReader(model)


def test_index_that_is_not_an_object_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(MergelabError, match="weight_map"):
        CheckpointReader(model)


# -- property: random corruptions load the truth or fail cleanly ----------------------------
def test_random_corruptions_load_what_the_file_says_or_raise_mergelab_error(tmp_path):
    """Whatever bytes are changed, cut or inserted, the reader either raises MergelabError or
    returns exactly what the reference safetensors loader reads from the same file; and when the
    header survived intact, the names, shapes and dtypes are the original ones. Never another
    exception, never tensors read from the wrong bytes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    original = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
                "b": torch.arange(5, dtype=torch.int64), "h": torch.ones(2, 3, dtype=torch.bfloat16)}
    good = tmp_path / "good.safetensors"
    save_file(original, good, metadata={"format": "pt"})
    pristine = good.read_bytes()
    header_end = 8 + struct.unpack("<Q", pristine[:8])[0]
    target = tmp_path / "bad.safetensors"

    edits = st.one_of(
        st.tuples(st.just("set"), st.integers(0, len(pristine) - 1), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, len(pristine) - 1), st.integers(1, 64)),
        st.tuples(st.just("insert"), st.integers(0, len(pristine)), st.integers(0, 255)),
    )

    @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(edits, min_size=1, max_size=4))
    def check(changes):
        data = bytearray(pristine)
        for kind, position, value in changes:
            position = min(position, len(data))
            if kind == "set" and position < len(data):
                data[position] = value
            elif kind == "cut":
                del data[position:position + value]
            elif kind == "insert":
                data[position:position] = bytes([value])
        target.write_bytes(bytes(data))
        try:
            with CheckpointReader(target) as reader:
                ours = {name: reader.get(name) for name in reader.tensors}
        except MergelabError:
            return
        reference = load_file(target)  # must accept what we accept
        assert set(ours) == set(reference)
        for name, tensor in ours.items():
            assert tensor.dtype == reference[name].dtype and tensor.shape == reference[name].shape
            assert torch.equal(tensor.view(torch.uint8), reference[name].view(torch.uint8))
        if bytes(data[:header_end]) == pristine[:header_end]:
            assert {n: (t.dtype, t.shape) for n, t in ours.items()} == \
                {n: (t.dtype, t.shape) for n, t in original.items()}

    check()


# -- .bin checkpoints that safe loading refuses ---------------------------------------------
class _NotATensor:
    pass


def test_pickle_with_objects_gets_one_line_and_no_advice_to_unpickle(tmp_path, world):
    model = tmp_path / "pickled"
    model.mkdir()
    torch.save({"w": torch.ones(2), "extra": _NotATensor()}, model / "pytorch_model.bin")
    with pytest.raises(MergelabError) as info:
        CheckpointReader(model)
    message = str(info.value)
    assert "not a plain tensor checkpoint" in message and "convert it to safetensors" in message
    assert "weights_only" not in message and "\n" not in message
    code, stderr = cli("merge", linear_config(tmp_path, world["a"], model), tmp_path / "out", "--quiet")
    assert code == 2 and "not a plain tensor checkpoint" in stderr and "weights_only" not in stderr


# -- 2. two runs into one target -------------------------------------------------------------
def test_the_second_of_two_planned_merges_into_one_target_is_refused(tmp_path, world):
    """Both runs pass the plan-time check; only the first to publish wins, the other fails
    and the winner's complete output is untouched."""
    from mergelab.engine import MergeOptions, execute, plan_merge

    out = tmp_path / "out"
    first = plan_merge(linear_config(tmp_path, world["a"], world["b"], name="1.yml"), out, MergeOptions(quiet=True))
    second = plan_merge(linear_config(tmp_path, world["a"], world["c"], name="2.yml"), out, MergeOptions(quiet=True))
    execute(first)
    winner = load_file(out / "model.safetensors")
    with pytest.raises(MergelabError, match="already exists"):
        execute(second)
    for plan in (first, second):
        plan.close()
    assert all(torch.equal(t, winner[n]) for n, t in load_file(out / "model.safetensors").items())
    assert leftovers(out) == []


def test_publishing_never_replaces_a_directory_that_appeared_meanwhile(tmp_path):
    """The last step itself is race-free: the rename refuses an existing target."""
    from mergelab.outdir import publish

    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs").write_text("finished output of another run")
    for target_exists_empty in (False, True):
        tmp = tmp_path / ".out.tmp-x"
        tmp.mkdir()
        (tmp / "mine").write_text("ours")
        if target_exists_empty:
            (out / "theirs").unlink()
        with pytest.raises(MergelabError, match="appeared while this run was writing"):
            publish(tmp, out, force=False)
        assert tmp.exists()  # the caller (atomic_directory) removes it
        (tmp / "mine").unlink()
        tmp.rmdir()
    assert os.listdir(out) == []


def test_two_concurrent_console_merges_into_one_target_one_wins(tmp_path, world):
    out = tmp_path / "out"
    configs = [linear_config(tmp_path, world["a"], world["b"], name="1.yml"),
               linear_config(tmp_path, world["a"], world["c"], name="2.yml")]
    procs = [subprocess.Popen([*COMMAND, "merge", str(c), str(out), "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in configs]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.startswith("error: output directory ") and "Traceback" not in loser
    merged = load_file(out / "model.safetensors")  # complete, and from one of the two runs
    expected = [mergelab.merge(c, tmp_path / f"alone-{i}", quiet=True) for i, c in enumerate(configs)]
    assert any(all(torch.equal(merged[n], t) for n, t in load_file(e / "model.safetensors").items())
               for e in expected)
    assert leftovers(out) == []


def test_force_replaces_a_finished_output_atomically(tmp_path, world):
    out = tmp_path / "out"
    mergelab.merge(linear_config(tmp_path, world["a"], world["b"], name="1.yml"), out, quiet=True)
    mergelab.merge(linear_config(tmp_path, world["a"], world["c"], name="2.yml"), out, quiet=True, force=True)
    mergelab.merge(linear_config(tmp_path, world["a"], world["c"], name="2.yml"), tmp_path / "ref", quiet=True)
    assert all(torch.equal(t, load_file(tmp_path / "ref" / "model.safetensors")[n])
               for n, t in load_file(out / "model.safetensors").items())
    assert leftovers(out) == []


# -- 3. outputs inside inputs ----------------------------------------------------------------
def test_output_inside_an_input_model_directory_is_refused(tmp_path, world):
    config = linear_config(tmp_path, world["a"], world["b"])
    inside = Path(world["b"]) / "merged"
    with pytest.raises(MergelabError, match="lies inside input model"):
        mergelab.merge(config, inside, quiet=True)
    assert not inside.exists()
    link = tmp_path / "link-to-b"
    link.symlink_to(world["b"], target_is_directory=True)
    with pytest.raises(MergelabError, match="lies inside input model"):  # symlinks are resolved first
        mergelab.merge(config, link / "merged", quiet=True)
    code, stderr = cli("merge", config, inside, "--quiet")
    assert code == 2 and "lies inside input model" in stderr
    assert not inside.exists() and sorted(os.listdir(world["b"])) == sorted(os.listdir(world["a"]))


def test_dangling_symlink_as_output_is_refused_and_leaves_nothing(tmp_path, world):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(MergelabError, match="does not exist; remove the link"):
        mergelab.merge(linear_config(tmp_path, world["a"], world["b"]), out, quiet=True)
    assert leftovers(out) == [] and not (tmp_path / "nowhere").exists()


def test_existing_file_as_output_is_refused_even_with_force(tmp_path, world):
    out = tmp_path / "out"
    out.write_text("keep me")
    for force in (False, True):
        with pytest.raises(MergelabError, match="exists and is not a directory"):
            mergelab.merge(linear_config(tmp_path, world["a"], world["b"]), out, quiet=True, force=force)
    assert out.read_text() == "keep me"


# -- 4. temporary directories after signals ---------------------------------------------------
SLOW_MERGE = textwrap.dedent("""
    import sys, time
    import mergelab.engine as engine
    real = engine._merge_tensor
    def slow(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)
    engine._merge_tensor = slow
    from mergelab.cli import main
    sys.argv = ["mergelab", "merge", sys.argv[1], sys.argv[2], "--quiet"]
    main()
""")


def _start_slow_merge(tmp_path, world):
    out = tmp_path / "out"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_MERGE)
    proc = subprocess.Popen([sys.executable, str(script), str(linear_config(tmp_path, world["a"], world["b"])),
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not leftovers(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    time.sleep(0.3)  # now inside the streaming loop, with shards half-written
    return proc, out


def test_sigterm_mid_merge_removes_the_temporary_directory(tmp_path, world):
    proc, out = _start_slow_merge(tmp_path, world)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert leftovers(out) == [] and not out.exists()


def test_after_kill_9_the_next_run_removes_the_stale_temporary_directory(tmp_path, world):
    proc, out = _start_slow_merge(tmp_path, world)
    proc.kill()
    proc.wait(timeout=60)
    stale = leftovers(out)
    assert len(stale) == 1  # kill -9 cannot be cleaned up by the victim...
    proc = console("merge", linear_config(tmp_path, world["a"], world["b"]), out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert stale[0] in proc.stderr and "which is gone" in proc.stderr  # ...the next run does, and says so
    assert leftovers(out) == [] and (out / "model.safetensors").is_file()


def test_temporary_directories_of_live_processes_are_left_alone(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / (_temp_prefix(out) + "abc")
    mine.mkdir()
    foreign = tmp_path / f".{out.name}.tmp-unparsable"
    foreign.mkdir()
    assert remove_stale_temporaries(out) == []
    assert mine.exists() and foreign.exists()


# -- read-only locations, full disks, free space ---------------------------------------------
def test_read_only_location_is_refused_before_any_work(tmp_path, world):
    place = read_only_dir()
    if place is None:
        pytest.skip("no read-only file system here")
    readonly = place / "mergelab-out"
    config = linear_config(tmp_path, world["a"], world["b"])
    with pytest.raises(MergelabError, match="not writable"):
        mergelab.merge(config, readonly, quiet=True)
    code, stderr = cli("merge", config, readonly, "--quiet")
    assert code == 2 and "is not writable" in stderr


def test_too_little_free_space_is_refused_before_any_work(tmp_path, world, monkeypatch):
    import shutil

    from mergelab import outdir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    out = tmp_path / "out"
    with pytest.raises(MergelabError, match=r"not enough disk space .* has 0.00 MB free"):
        mergelab.merge(linear_config(tmp_path, world["a"], world["b"]), out, quiet=True)
    assert not out.exists() and leftovers(out) == []


def test_disk_full_while_writing_leaves_nothing(tmp_path, world, monkeypatch):
    import errno

    from mergelab import io

    calls = {"n": 0}
    real = os.pwrite

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(io.os, "pwrite", failing)
    out = tmp_path / "out"
    with pytest.raises(MergelabError, match="the disk is full"):
        mergelab.merge(linear_config(tmp_path, world["a"], world["b"]), out, quiet=True)
    assert not out.exists() and leftovers(out) == []


def test_file_size_limit_in_a_real_process_gives_one_error_line(tmp_path, world):
    """RLIMIT_FSIZE makes the kernel refuse the writes, as a full disk would."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "out"
    proc = console("merge", linear_config(tmp_path, world["a"], world["b"]), out, "--quiet", preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: writing ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and leftovers(out) == []


# -- reader lifetime --------------------------------------------------------------------------
def _open_files_under(*roots: Path) -> list[str]:
    """The files under ``roots`` that this process holds open. (Counting every descriptor was
    flaky: another test's leftover thread or pool may open or close one of its own meanwhile.)"""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed between the listing and the read
            continue
        if any(target.startswith(str(root)) for root in roots):
            held.append(target)
    return held


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_readers_close_every_file_on_every_path(tmp_path, world):
    roots = (Path(world["a"]).parent, tmp_path)  # the input models and every output
    before = _open_files_under(*roots)  # what earlier tests hold on the shared world is not this test's
    config = linear_config(tmp_path, world["a"], world["c"])  # c is sharded
    for index in range(20):
        mergelab.merge(config, tmp_path / f"out{index}", quiet=True, threads=4)
    for index in range(5):  # a check that fails after the readers were opened (the output exists)
        with pytest.raises(MergelabError, match="already exists"):
            mergelab.merge(config, tmp_path / f"out{index}", quiet=True)
    # nothing the merges opened is still open (earlier tests' leftovers may close meanwhile: a multiset difference)
    assert Counter(_open_files_under(*roots)) - Counter(before) == Counter()


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_a_reader_dropped_without_close_closes_its_files(tmp_path, world):
    """Readers hold raw descriptors; one a caller forgets to close must not keep them until the
    process ends (a loop over many models would run out of descriptors)."""
    import gc

    roots = (Path(world["c"]),)  # the sharded model: one descriptor per shard read
    before = Counter(_open_files_under(*roots))
    reader = CheckpointReader(world["c"])
    for name in reader.tensors:
        reader.get(name)
    assert Counter(_open_files_under(*roots)) - before  # the shards are open while it lives
    del reader
    gc.collect()
    assert Counter(_open_files_under(*roots)) - before == Counter()
