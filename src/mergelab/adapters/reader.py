"""A base model plus a LoRA adapter, read as if it were one merged checkpoint.

``AdapterReader`` has the interface of ``mergelab.io.CheckpointReader`` (``tensors``, ``get``,
``path``, ``config``, ``label``, ``close``), so every merge method, ``inspect`` and the grid take
``BASE+ADAPTER`` (mergekit's syntax) or an adapter directory wherever they take a model. Each
``get`` reads one base tensor and, for an adapted module, adds scale·B·A to it on the spot:
the merged model is never built.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable

import torch

from mergelab.adapters.peft_dir import LoraAdapter, add_lora_, is_adapter_dir, read_adapter_config
from mergelab.errors import MergelabError
from mergelab.io import CheckpointReader, TensorInfo, resolve_model


class AdapterReader:
    """The tensors of ``base`` with ``adapter`` merged in, one at a time.

    Tensors the adapter does not touch pass through from the base; ``modules_to_save`` tensors
    come from the adapter; adapted weights are W + scale·B·A (DoRA: rescaled per output row)
    in the base's dtype. ``path`` and ``config`` are the base's, so a merge copies the base's
    config and tokenizer.

    Example:
        >>> with AdapterReader("models/base", "adapters/math") as reader:  # doctest: +SKIP
        ...     q = reader.get("model.layers.0.self_attn.q_proj.weight")
    """

    reads_into_buffers = True  # get(name, out=) fills a caller's uint8 buffer, as CheckpointReader.get does

    def __init__(self, base: str | Path, adapter: str | Path, label: str | None = None):
        self.label = label or f"{base}+{adapter}"
        self.base = CheckpointReader(base, label=str(base))
        try:
            self.adapter = LoraAdapter(adapter, label=str(adapter))
        except BaseException:
            self.base.close()
            raise
        try:
            tied = bool((self.base.config or {}).get("tie_word_embeddings"))
            self.modules = self.adapter.check_against(self.base.tensors, str(base), tied_embeddings=tied)
        except BaseException:
            self.close()
            raise
        self.path = self.base.path
        self.adapter_path = self.adapter.path
        self.config = self.base.config
        self.tensors: dict[str, TensorInfo] = dict(self.base.tensors)
        for name, key in self.adapter.replaced.items():  # same name, shape checked: the adapter's bytes
            self.tensors[name] = TensorInfo(name, self.base.tensors[name].shape, self.adapter.reader.tensors[key].dtype,
                                            self.adapter.file, self.adapter.reader.tensors[key].offsets)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor of the merged model (a CPU tensor in its stored dtype); ``out``: a
        flat ``uint8`` buffer to write it into, as ``CheckpointReader.get`` takes."""
        key = self.adapter.replaced.get(name)
        reader, key = (self.adapter.reader, key) if key is not None else (self.base, name)
        if name not in self.tensors:
            raise MergelabError(f"model '{self.label}' has no tensor '{name}'")
        module = self.modules.get(name)
        if module is None:
            return reader.get(key, out=out)
        # W is read into this thread's reused buffer (a fresh multi-hundred-MB tensor costs a
        # page fault per 4 KB page, more than the arithmetic on it).
        info = reader.tensors[key]
        numel = math.prod(info.shape)
        compute = torch.float64 if info.dtype == torch.float64 else torch.float32
        weight = reader.get(key, out=_buffer("raw", numel * info.dtype.itemsize))
        result = (torch.empty(info.shape, dtype=info.dtype) if out is None
                  else out[:numel * info.dtype.itemsize].view(info.dtype).view(info.shape))
        if module.kind == "linear":
            return _merge_rows(weight, self.adapter, module, compute, result)
        work = _buffer("work", numel * compute.itemsize).view(compute).view(info.shape)
        return result.copy_(add_lora_(work.copy_(weight), self.adapter, module))

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def close(self) -> None:
        self.base.close()
        if hasattr(self, "adapter"):
            self.adapter.close()

    def __enter__(self) -> "AdapterReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_LOCAL = threading.local()  # per thread: buffers every AdapterReader reuses (dead once get returns)


def _buffer(kind: str, nbytes: int) -> torch.Tensor:
    buffer = getattr(_LOCAL, kind, None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_LOCAL, kind, buffer)
    return buffer[:nbytes]


BLOCK_BYTES = 1 << 20  # rows of W + scale·B·A formed at a time: they stay in cache from read to write


def _merge_rows(weight: torch.Tensor, adapter: LoraAdapter, module, compute: torch.dtype,
                result: torch.Tensor) -> torch.Tensor:
    """``result`` = W + scale·B·A (DoRA: each row rescaled to its magnitude) for a (out, in)
    weight, a block of rows at a time: convert, add the low-rank product, cast back while the
    block is in cache (three passes over memory fused into one)."""
    a = adapter.reader.get(module.a_key).to(compute)  # (r, in)
    b = adapter.reader.get(module.b_key).to(compute)  # (out, r)
    magnitude = None if module.magnitude_key is None else adapter.reader.get(module.magnitude_key).to(compute)
    rows, columns = weight.shape
    step = max(1, BLOCK_BYTES // (columns * compute.itemsize))
    work = _buffer("block", step * columns * compute.itemsize).view(compute)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = work[:(stop - start) * columns].view(stop - start, columns)
        block.copy_(weight[start:stop]).addmm_(b[start:stop], a, alpha=module.scale)
        if magnitude is not None:
            block.mul_((magnitude[start:stop] / torch.linalg.norm(block, dim=1)).unsqueeze(1))
        result[start:stop].copy_(block)
    return result


def adapter_input(ref: str, locate: Callable[[str], Path] = resolve_model) -> tuple[Path, Path] | None:
    """(base, adapter) directories when ``ref`` names a model with an adapter, else None.

    ``ref`` is ``BASE+ADAPTER`` or a PEFT adapter directory whose ``adapter_config.json`` names
    its base (``base_model_name_or_path``: a path, or a Hub id found in the local cache). A
    path that exists is taken as it is, even when it contains '+'. ``locate`` turns a model
    reference into a path (the engine's also looks beside the config file).
    """
    path = _try(locate, ref)
    if path is not None:
        if not is_adapter_dir(path):
            return None
        base_name = read_adapter_config(path).get("base_model_name_or_path")
        if not base_name:
            raise MergelabError(f"adapter '{ref}' does not name its base model (base_model_name_or_path is empty in "
                                f"{path}/adapter_config.json); write it as BASE+{ref}")
        base = _try(locate, base_name) or _try(locate, str(path.parent / base_name))
        if base is None:
            raise MergelabError(f"adapter '{ref}' was trained on '{base_name}', which is neither a local path nor "
                                f"in the Hugging Face cache; write it as BASE+{ref} with the base's path")
        return base, path
    if "+" not in ref:
        return None
    splits = [(ref[:i], ref[i + 1:]) for i, char in enumerate(ref) if char == "+"]
    for left, right in splits:
        base, adapter = _try(locate, left), _try(locate, right)
        if base is not None and adapter is not None:
            if not is_adapter_dir(adapter):
                raise MergelabError(f"model '{ref}': {adapter} is not a PEFT adapter (no adapter_config.json); "
                                    f"BASE+ADAPTER needs an adapter directory after the '+'")
            return base, adapter
    left, right = splits[-1]
    missing = left if _try(locate, left) is None else right
    raise MergelabError(f"model '{ref}': '{missing}' does not exist; write BASE+ADAPTER with an existing base model "
                        f"and PEFT adapter directory")


def _try(locate: Callable[[str], Path], ref: str) -> Path | None:
    if not ref:
        return None
    try:
        return locate(ref)
    except MergelabError:
        return None


def open_reader(ref: str | Path, locate: Callable[[str], Path] = resolve_model, label: str | None = None):
    """A reader for a model reference: a ``CheckpointReader`` for a plain model, an
    ``AdapterReader`` for ``BASE+ADAPTER`` or an adapter directory."""
    found = adapter_input(str(ref), locate)
    if found is not None:
        return AdapterReader(*found, label=label or str(ref))
    return CheckpointReader(locate(str(ref)), label=label or str(ref))
