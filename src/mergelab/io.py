"""Checkpoint I/O: read a Hugging Face model directory one tensor at a time, write sharded
safetensors one tensor at a time, and only ever show the user a finished output directory.

Safetensors files are read with positional reads into fresh buffers rather than through a
memory map: mapped pages count towards the process' resident memory, so a merge of five
1.5 GB models would *look* like it used 7.5 GB. The file format is simple and documented
(8-byte header length, JSON header, one flat byte buffer), and the reader checks every
header against the file size, so truncated files are caught before any work starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from mergelab.errors import MergelabError
from mergelab.outdir import atomic_directory, check_output_dir  # noqa: F401  (re-exported)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# Files next to the weights that describe the model but are not part of the output.
NOT_COPIED = {"README.md", "mergelab_config.yml"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, read from headers only."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offsets: tuple[int, int] | None = None  # byte range in a safetensors file, absolute


def parse_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """Turn 'bfloat16' / 'bf16' / 'float32' / torch.float16 into a torch dtype (None passes)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {
        "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
    }
    key = str(name).lower().removeprefix("torch.")
    if key not in aliases:
        raise MergelabError(
            f"{what} '{name}' is not a floating-point dtype mergelab can write; "
            f"use one of float32, float16, bfloat16, float64"
        )
    return aliases[key]


MAX_HEADER_BYTES = 100_000_000
MAX_NUMEL = 2**63 - 1


def _strict_int(value: object) -> int:
    """An integer from a header (JSON ints only: no bools, floats or strings)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the name '{key}' appears twice")
        seen[key] = value
    return seen


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """List the tensors of one safetensors file from its header, checking the whole layout.

    The format's rules are enforced, so that no tensor can be read from the wrong bytes: the
    header is a JSON object with unique names, known dtypes and non-negative integer shapes and
    offsets; each tensor's byte count matches its shape; and the tensors' byte ranges, sorted,
    tile the data section exactly (no overlap, no gap, nothing outside it).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise MergelabError(f"{path} is not a safetensors file (only {size} bytes); re-download or re-save it")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise MergelabError(
                    f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file has "
                    f"{size}; re-download or re-save it"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise MergelabError(f"cannot read {path}: {exc.strerror or exc}; check the file and its permissions") from None
    try:
        header = json.loads(raw, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MergelabError(f"{path} has a corrupt safetensors header ({exc}); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise MergelabError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, not an "
                            f"object); re-download or re-save it")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise MergelabError(f"{path} has a corrupt safetensors header (__metadata__ is not an object)")
            continue
        try:
            if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
                raise ValueError("unexpected fields")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(_strict_int(d) for d in entry["shape"])
            begin, end = (_strict_int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergelabError(f"{path}: tensor '{name}' has an unreadable header entry {_clip(entry)}; "
                                f"re-download or re-save it") from None
        if any(dim < 0 for dim in shape):
            raise MergelabError(f"{path} is corrupt: tensor '{name}' has a negative dimension in shape {shape}")
        numel = _numel(shape)
        if numel > MAX_NUMEL:
            raise MergelabError(f"{path} is corrupt: tensor '{name}' has shape {shape}, whose element count "
                                f"overflows 64 bits")
        if not 0 <= begin <= end:
            raise MergelabError(f"{path} is corrupt: tensor '{name}' has byte range [{begin}, {end}); "
                                f"re-download or re-save it")
        if end > data_len:
            raise MergelabError(
                f"{path} is truncated: tensor '{name}' ends at byte {end} of the data but the file holds "
                f"only {data_len}; re-download or re-save it"
            )
        if end - begin != numel * dtype.itemsize:
            raise MergelabError(f"{path} is corrupt: tensor '{name}' has {end - begin} bytes for shape {shape} "
                                f"of {entry['dtype']}; re-download or re-save it")
        ranges.append((begin, end, name))
        tensors[name] = TensorInfo(name, shape, dtype, path, (data_start + begin, data_start + end))
    _check_tiling(path, sorted(ranges), data_len)
    return tensors


def _check_tiling(path: Path, ranges: list[tuple[int, int, str]], data_len: int) -> None:
    """Sorted byte ranges must cover [0, data_len) exactly: each starts where the last ended."""
    position, previous = 0, None
    for begin, end, name in ranges:
        if begin < position:
            raise MergelabError(f"{path} is corrupt: tensors '{previous}' and '{name}' share bytes "
                                f"[{begin}, {position}); re-download or re-save it")
        if begin > position:
            raise MergelabError(f"{path} is corrupt: bytes [{position}, {begin}) of the data belong to no tensor "
                                f"(before '{name}'); re-download or re-save it")
        position, previous = end, name
    if position != data_len:
        raise MergelabError(f"{path} is corrupt: the data section has {data_len} bytes but its tensors cover "
                            f"{position}; re-download or re-save it")


def _clip(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise MergelabError(f"{index_path} is not a valid index file ({type(exc).__name__}: {exc}); "
                            f"re-download the model") from None
    if not isinstance(weight_map, dict):
        raise MergelabError(f"{index_path}: 'weight_map' is not an object; re-download the model")
    directory = index_path.parent.resolve()
    files = {}
    for name, shard in weight_map.items():
        shard_path = index_path.parent / shard if isinstance(shard, str) else None
        # A shard must be a file of this directory: an index must not reach elsewhere on disk.
        if shard_path is None or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise MergelabError(f"{index_path} names shard {shard!r} for tensor '{name}', which is not a file name "
                                f"in {index_path.parent}; re-download the model")
        if not shard_path.is_file() or shard_path.resolve().parent != directory:
            raise MergelabError(
                f"{index_path} names shard '{shard}' (for tensor '{name}') but {shard_path} does not exist; "
                f"re-download the missing shard"
            )
        files[name] = shard_path
    return files


def load_tensor_file(file: Path, label: str | None = None) -> dict[str, torch.Tensor]:
    """Load a PyTorch ``.bin``/``.pt`` state dict safely (``weights_only``, memory-mapped).

    A file that pickles anything but tensors and plain containers is refused with one line
    that says to convert it, never with advice to unpickle it unsafely.
    """
    where = f"model '{label}': " if label else ""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except OSError as exc:
        raise MergelabError(f"{where}cannot read {file}: {exc.strerror or exc}") from None
    except Exception:  # torch raises many types for pickles it will not load
        raise MergelabError(unsafe_checkpoint_message(file, label)) from None
    if not isinstance(state, dict):
        raise MergelabError(f"{where}{file} does not hold a state dict (a mapping of names to tensors); "
                            f"convert it to safetensors")
    return state


def unsafe_checkpoint_message(file: Path | str, label: str | None = None) -> str:
    """The one message for a pickle checkpoint that safe loading refuses (shared by every loader)."""
    where = f"model '{label}': " if label else ""
    return (f"{where}{file} is not a plain tensor checkpoint (it is corrupt or pickles other Python objects, "
            f"which mergelab never loads); convert it to safetensors with the code that wrote it")


class CheckpointReader:
    """Lazy access to the tensors of one model directory (or one weights file).

    Handles sharded safetensors with ``model.safetensors.index.json``, a single
    ``model.safetensors`` (or any ``*.safetensors`` file), and PyTorch ``.bin`` checkpoints
    (loaded with ``weights_only=True`` and ``mmap=True``, one shard at a time).

    Example:
        >>> reader = CheckpointReader("path/to/model")  # doctest: +SKIP
        >>> reader.tensors["model.embed_tokens.weight"].shape  # doctest: +SKIP
        (32000, 2048)
        >>> reader.get("model.norm.weight")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        if not self.path.exists():
            raise MergelabError(f"model '{self.label}': {self.path} does not exist; check the path")
        self._handles: dict[Path, int] = {}  # one descriptor per file, shared by all threads (pread)
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = self._list_tensors()
        if not self.tensors:
            raise MergelabError(f"model '{self.label}': {self.path} holds no tensors")

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # A reader that is dropped without close() (a caller's loop over many models) must not
        # keep its descriptors until the process ends: they are raw os.open handles.
        if getattr(self, "_handles", None):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - never raise from a finalizer (e.g. at interpreter exit)
                pass

    # -- listing -------------------------------------------------------------------------
    def _read_config(self) -> dict | None:
        config_path = self.path / "config.json" if self.path.is_dir() else None
        if config_path is None or not config_path.is_file():
            return None
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise MergelabError(f"model '{self.label}': {config_path} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise MergelabError(f"model '{self.label}': {config_path} is not a JSON object")
        return config

    def weight_files(self) -> list[Path]:
        """The files the tensors are read from."""
        return sorted({info.file for info in self.tensors.values()})

    def _list_tensors(self) -> dict[str, TensorInfo]:
        path = self.path
        if path.is_file():
            if path.suffix == ".safetensors":
                return read_safetensors_header(path)
            if path.suffix in (".bin", ".pt", ".pth"):
                return self._list_bin([path])
            raise MergelabError(f"model '{self.label}': {path} is neither a .safetensors nor a .bin file")
        if (path / SAFE_INDEX).is_file():
            files = _read_index(path / SAFE_INDEX)
            headers = {shard: read_safetensors_header(shard) for shard in sorted(set(files.values()))}
            tensors = {}
            for name, shard in files.items():
                if name not in headers[shard]:
                    raise MergelabError(
                        f"{path / SAFE_INDEX} puts tensor '{name}' in {shard.name}, but that shard does not "
                        f"contain it; re-download the model"
                    )
                tensors[name] = headers[shard][name]
            return tensors
        if (path / SAFE_SINGLE).is_file():
            return read_safetensors_header(path / SAFE_SINGLE)
        if (path / BIN_INDEX).is_file():
            return self._list_bin(sorted(set(_read_index(path / BIN_INDEX).values())))
        if (path / BIN_SINGLE).is_file():
            return self._list_bin([path / BIN_SINGLE])
        loose = sorted(p for p in path.glob("*.safetensors"))
        if loose:
            tensors = {}
            for file in loose:
                for name, info in read_safetensors_header(file).items():
                    if name in tensors:
                        raise MergelabError(f"model '{self.label}': tensor '{name}' appears in two files under {path}")
                    tensors[name] = info
            return tensors
        raise MergelabError(
            f"model '{self.label}': no weights found in {path} (expected {SAFE_INDEX}, {SAFE_SINGLE}, "
            f"{BIN_INDEX} or {BIN_SINGLE})"
        )

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if file not in self._bin_cache:
                self._bin_cache = {file: load_tensor_file(file, self.label)}  # one shard mapped at a time
            return self._bin_cache[file]

    def _list_bin(self, files: list[Path]) -> dict[str, TensorInfo]:
        tensors = {}
        for file in files:
            for name, tensor in self._load_bin(file).items():
                if isinstance(tensor, torch.Tensor):
                    tensors[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)
        return tensors

    # -- reading -------------------------------------------------------------------------
    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into memory (a CPU tensor in its stored dtype).

        ``out``: a flat CPU ``uint8`` buffer of at least the tensor's byte size to read into
        (the result is a view of its first bytes), so that a caller merging tensor after tensor
        reuses one buffer instead of faulting in fresh pages for each; None: a fresh tensor.
        """
        try:
            info = self.tensors[name]
        except KeyError:
            raise MergelabError(f"model '{self.label}' has no tensor '{name}'") from None
        if info.offsets is None:
            tensor = self._load_bin(info.file)[name]
            if out is None:
                return tensor.clone()
            view = out[:tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
            return view.copy_(tensor)
        begin, end = info.offsets
        if out is not None and (out.dtype != torch.uint8 or out.numel() < end - begin or out.device.type != "cpu"):
            raise ValueError(f"out must be a CPU uint8 buffer of at least {end - begin} bytes for '{name}'")
        buffer = torch.empty(end - begin, dtype=torch.uint8) if out is None else out[:end - begin]
        handle = self._handle(info.file)
        view = memoryview(buffer.numpy())
        done = 0
        while done < end - begin:
            try:
                got = os.preadv(handle, [view[done:]], begin + done)
            except OSError as exc:
                raise MergelabError(f"model '{self.label}': reading '{name}' from {info.file} failed: "
                                    f"{exc.strerror}") from None
            if got <= 0:
                raise MergelabError(f"model '{self.label}': {info.file} ended early while reading '{name}'")
            done += got
        return buffer.view(info.dtype).reshape(info.shape)

    def _handle(self, file: Path) -> int:
        handle = self._handles.get(file)
        if handle is None:
            with self._lock:
                handle = self._handles.get(file)
                if handle is None:
                    try:
                        handle = self._handles[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    except OSError as exc:
                        raise MergelabError(f"model '{self.label}': cannot open {file}: {exc.strerror}") from None
        return handle

    def close(self) -> None:
        """Close every file this reader opened (from any thread). Safe to call twice."""
        with self._lock:
            handles, self._handles = self._handles, {}
            self._bin_cache = {}
        for handle in handles.values():
            os.close(handle)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


_NEVER_FETCHED = ["*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "*.pt", "*.pth", "*.ckpt"]


def resolve_model(ref: str | Path) -> Path:
    """A local directory or file as is; otherwise a Hugging Face Hub id (``org/name[@revision]``):
    taken from the local Hugging Face cache when it is there (so a cached model works offline),
    else downloaded (weights, config and tokenizer only) through ``huggingface_hub``."""
    local = Path(ref).expanduser()
    if local.exists():
        return local
    text = str(ref)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise MergelabError(f"model '{ref}': {local} does not exist; check the path")
    repo_id, _, revision = text.partition("@")
    import huggingface_hub

    with _quiet_hub():
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None, local_files_only=True,
                                                          ignore_patterns=_NEVER_FETCHED))
        except Exception:  # not (completely) cached: fetch it
            pass
        if not _hub_online():
            raise MergelabError(f"model '{ref}' is not a local path and not in the Hugging Face cache, and the Hub "
                                f"cannot be reached (offline); check the path, or download the model first")
        try:
            files = huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision or None)
            skip = _NEVER_FETCHED + (["*.bin"] if any(f.endswith(".safetensors") for f in files) else [])
            return Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None, ignore_patterns=skip))
        except Exception as exc:  # network errors come in many types
            first = (str(exc).strip().splitlines() or [""])[0]
            raise MergelabError(
                f"model '{ref}' is not a local path and could not be fetched from the Hugging Face Hub "
                f"({type(exc).__name__}: {first}); check the name, your network, or download it first"
            ) from None


def _hub_online() -> bool:
    """False when HF_HUB_OFFLINE is set or the Hub's host name does not resolve: then a fetch
    would only retry for half a minute before failing."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443)
    except OSError:
        return False
    return True


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub logs each retry as a warning; mergelab reports the outcome as one line."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- writing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    shard: int
    begin: int  # absolute byte offset in the shard file
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class ShardedWriter:
    """Write safetensors shards whose layout is fixed up front, one tensor at a time.

    Knowing every output name, shape and dtype before the merge starts lets the writer put
    each shard's header on disk first and each tensor straight at its offset, so nothing
    is buffered and tensors may arrive in any order (from any thread).

    Example:
        >>> writer = ShardedWriter(tmp_dir, [("w", (2, 2), torch.float32)])  # doctest: +SKIP
        >>> writer.write("w", torch.zeros(2, 2)); writer.finish()  # doctest: +SKIP
    """

    def __init__(self, directory: Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 shard_size: int = 5 * 1024**3, attach: bool = False):
        """``attach``: open shards another writer of the same entries created (in another
        process, say, on a shared file system) and write tensors into them at the same
        offsets; their headers are checked, not rewritten."""
        self.directory = Path(directory)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        for name, shape, dtype in entries:
            nbytes = dtype.itemsize * _numel(shape)
            if shards[-1] and used + nbytes > shard_size:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            used += nbytes
        count = len(shards)
        self.files = [
            SAFE_SINGLE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self.total_size = 0
        for index, shard in enumerate(shards):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            position = start
            for name, shape, dtype, nbytes in shard:
                self.slots[name] = _Slot(index, position, nbytes, shape, dtype)
                position += nbytes
            head = struct.pack("<Q", len(raw)) + raw
            if attach:
                fd = os.open(self.directory / self.files[index], os.O_RDWR)
                self._fds.append(fd)
                if os.pread(fd, len(head), 0) != head or os.fstat(fd).st_size != position:
                    self.close()
                    raise RuntimeError(f"{self.directory / self.files[index]} was not laid out for these tensors")
            else:
                fd = os.open(self.directory / self.files[index], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, position)
            self.total_size += offset
        self._written: set[str] = set()
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots[name]
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {slot.shape} {slot.dtype}")
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < slot.nbytes:
            done += os.pwrite(self._fds[slot.shard], data[done:], slot.begin + done)
        with self._lock:
            self._written.add(name)

    def record(self, names: Iterable[str]) -> None:
        """Count tensors as written that another writer attached to these shards wrote."""
        with self._lock:
            self._written.update(name for name in names if name in self.slots)

    def finish(self) -> list[str]:
        """Close the shards and write the index (when there is more than one shard)."""
        missing = set(self.slots) - self._written
        self.close()
        if missing:
            raise RuntimeError(f"tensors never written: {sorted(missing)[:5]}")
        if len(self.files) > 1:
            weight_map = {name: self.files[slot.shard] for name, slot in self.slots.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise MergelabError(f"shard size '{size}' is not a size; write it like 5GB, 500MB or 2GiB")
        unit = (match.group(2) or "B").upper().rstrip("B") or "B"
        scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise MergelabError(f"shard size must be positive, got {size}")
    return value


def copy_support_files(source: Path, target: Path, out_dtype: torch.dtype | None) -> None:
    """Copy config, tokenizer, generation and sentence-transformers files (everything but
    weights) from ``source`` to ``target``; set the dtype recorded in ``config.json``."""
    if not source.is_dir():
        return
    for item in source.iterdir():
        if item.name.startswith(".") or item.name in NOT_COPIED:
            continue
        if item.is_file() and (item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json")):
            continue
        destination = target / item.name
        if item.is_dir():
            shutil.copytree(item, destination, ignore=shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES)))
        elif item.name == "config.json" and out_dtype is not None:
            config = json.loads(item.read_text())
            dtype_name = str(out_dtype).removeprefix("torch.")
            config["torch_dtype"] = dtype_name
            if "dtype" in config:
                config["dtype"] = dtype_name
            destination.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(item, destination)
