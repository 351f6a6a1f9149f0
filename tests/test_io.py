"""Reading and writing checkpoints: headers only, one tensor at a time, atomic output."""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab import MergelabError
from mergelab.lm import tiny_llama
from mergelab.io import (
    CheckpointReader,
    ShardedWriter,
    atomic_directory,
    copy_support_files,
    parse_dtype,
    parse_size,
    read_safetensors_header,
)

from conftest import save_model


def test_reader_lists_headers_and_reads_tensors_of_a_sharded_checkpoint(tiny_world):
    reader = CheckpointReader(tiny_world["c"])
    assert len(reader.weight_files()) > 1  # really sharded
    state = {}
    for shard in reader.weight_files():
        state.update(load_file(shard))
    assert set(reader.tensors) == set(state)
    for name, tensor in state.items():
        assert reader.tensors[name].shape == tuple(tensor.shape)
        assert reader.tensors[name].dtype == tensor.dtype
        assert torch.equal(reader.get(name), tensor)


def test_reader_single_file_and_bare_safetensors_path(tiny_world):
    reader = CheckpointReader(tiny_world["a"])
    assert [f.name for f in reader.weight_files()] == ["model.safetensors"]
    direct = CheckpointReader(tiny_world["a"] / "model.safetensors")
    assert set(direct.tensors) == set(reader.tensors)
    assert reader.config["model_type"] == "llama"


def test_reader_reads_pytorch_bin_checkpoints(tmp_path):
    model = tiny_llama(seed=3)
    save_model(model, tmp_path / "m", safe=False)
    reader = CheckpointReader(tmp_path / "m")
    expected = model.state_dict()
    assert set(reader.tensors) == set(expected) - {"lm_head.weight"}  # tied, so not stored
    assert torch.equal(reader.get("model.norm.weight"), expected["model.norm.weight"])


def test_reader_from_threads_returns_the_same_tensors(tiny_world):
    reader = CheckpointReader(tiny_world["c"])
    names = list(reader.tensors)
    expected = {n: reader.get(n) for n in names}
    failures = []

    def worker(seed):
        order = names[:]
        random.Random(seed).shuffle(order)
        failures.extend(n for n in order if not torch.equal(reader.get(n), expected[n]))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_header_of_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MergelabError, match="truncated"):
        read_safetensors_header(path)


def test_writer_round_trips_through_safetensors_in_any_order(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor(2.5),
        "e": torch.tensor([True, False]),
    }
    writer = ShardedWriter(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    for name in ["d", "a", "e", "c", "b"]:
        writer.write(name, tensors[name])
    assert writer.finish() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_writer_shards_and_writes_an_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(256) for i in range(5)}  # 1 KiB each
    writer = ShardedWriter(tmp_path, [(n, (256,), torch.float32) for n in tensors], shard_size=2100)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    reader = CheckpointReader(tmp_path)
    for name, tensor in tensors.items():
        assert index["weight_map"][name] in files
        assert torch.equal(reader.get(name), tensor)


def test_writer_refuses_a_tensor_of_the_wrong_shape(tmp_path):
    writer = ShardedWriter(tmp_path, [("w", (2,), torch.float32)])
    with pytest.raises(ValueError):
        writer.write("w", torch.zeros(3))
    writer.close()


def test_atomic_directory_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_only_on_success_with_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, force=True):
            raise RuntimeError("boom")
    assert (target / "old").read_text() == "old"
    with atomic_directory(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["new"]


def test_support_files_are_copied_with_the_dtype_updated(tiny_world, tmp_path):
    copy_support_files(tiny_world["a"], tmp_path, torch.bfloat16)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1.5kb", 1500), (4096, 4096), ("123", 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_dtype_aliases_and_errors():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    with pytest.raises(MergelabError, match="float32, float16, bfloat16"):
        parse_dtype("int8")


class FakeHub:
    """Stands in for huggingface_hub (no network in tests): a cache holding ``cached`` repos and
    a Hub serving ``online`` repos from local directories."""

    def __init__(self, cached=None, online=None, files=("config.json", "model.safetensors", "pytorch_model.bin")):
        self.cached, self.online, self.files, self.calls = cached or {}, online or {}, list(files), []

    def install(self, monkeypatch, reachable: bool):
        import huggingface_hub

        from mergelab import io

        hub = self

        class Api:
            def list_repo_files(self, repo_id, revision=None):
                hub.calls.append(("list", repo_id, revision))
                if repo_id not in hub.online:
                    raise OSError(f"404 Client Error\nRepository Not Found for url: .../{repo_id}")
                return hub.files

        def download(repo_id, revision=None, ignore_patterns=(), local_files_only=False):
            hub.calls.append(("download", repo_id, revision, tuple(ignore_patterns), local_files_only))
            source = hub.cached if local_files_only else hub.online
            if repo_id not in source:
                raise OSError("not found")
            return str(source[repo_id])

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
        monkeypatch.setattr(io, "_hub_online", lambda: reachable)
        return self


def test_hub_ids_are_fetched_through_huggingface_hub(monkeypatch, tiny_world):
    from mergelab.io import resolve_model

    hub = FakeHub(online={"someorg/some-model": tiny_world["a"]}).install(monkeypatch, reachable=True)
    assert resolve_model("someorg/some-model@v1") == tiny_world["a"]
    assert ("list", "someorg/some-model", "v1") in hub.calls
    fetched = [c for c in hub.calls if c[0] == "download" and not c[4]]
    assert fetched and "*.bin" in fetched[0][3]  # safetensors present: skip the .bin duplicates


def test_a_cached_hub_model_is_used_without_the_network(monkeypatch, tiny_world):
    from mergelab.io import resolve_model

    hub = FakeHub(cached={"someorg/some-model": tiny_world["b"]}).install(monkeypatch, reachable=False)
    assert resolve_model("someorg/some-model") == tiny_world["b"]
    assert [c[0] for c in hub.calls] == ["download"] and hub.calls[0][4]  # local_files_only


def test_offline_and_uncached_hub_id_fails_at_once_with_one_line(monkeypatch):
    from mergelab.io import resolve_model

    hub = FakeHub().install(monkeypatch, reachable=False)
    with pytest.raises(MergelabError, match=r"not in the Hugging Face cache, and the Hub cannot be reached") as info:
        resolve_model("someorg/missing-model")
    assert "\n" not in str(info.value) and not [c for c in hub.calls if c[0] == "list"]


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    from mergelab.io import resolve_model

    FakeHub().install(monkeypatch, reachable=True)
    with pytest.raises(MergelabError, match="could not be fetched from the Hugging Face Hub") as info:
        resolve_model("someorg/missing-model")
    assert "\n" not in str(info.value) and "Repository Not Found" not in str(info.value)


def test_hub_reachability_respects_hf_hub_offline(monkeypatch):
    from huggingface_hub import constants

    from mergelab.io import _hub_online

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _hub_online() is False
