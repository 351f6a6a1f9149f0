"""The I/O floor of a linear merge: read N models tensor by tensor, convert to float32, sum,
cast back to the stored dtype and write one output of the same layout. No checks, no
weights, no threads of its own: the least work any streaming merge of these models does.

Reads use os.preadv (no mmap, as mergelab does) into one reused byte buffer, and the float32
sum lives in one reused buffer too, so no page is faulted in twice: the floor pays for memory
traffic, not for allocation. The output reuses the first model's safetensors headers, so every
tensor is written at the offset it had there.

    python benchmarks/floor.py OUT_DIR MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from pathlib import Path

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def read_header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
    return struct.pack("<Q", length) + raw, json.loads(raw)


class Buffers:
    """Grow-only scratch: one byte buffer for reads, float32 buffers for the sum and a converted input."""

    def __init__(self):
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.total = torch.empty(0)
        self.converted = torch.empty(0)

    def get(self, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        if getattr(self, name).numel() < count:
            setattr(self, name, torch.empty(count, dtype=dtype))
        return getattr(self, name)[:count]


BUFFERS = Buffers()


def read_tensor(fd: int, entry: dict, start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    buffer = BUFFERS.get("raw", end - begin, torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    while done < end - begin:
        done += os.preadv(fd, [view[done:]], start + begin + done)
    return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def merge_shard(file: str, models: list[Path], out: Path) -> None:
    raw, header = read_header(models[0] / file)
    fds = [os.open(model / file, os.O_RDONLY) for model in models]
    out_fd = os.open(out / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.pwrite(out_fd, raw, 0)
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    for name in names:
        entry = header[name]
        first = read_tensor(fds[0], entry, len(raw))
        total = BUFFERS.get("total", first.numel(), torch.float32).view(first.shape).copy_(first)
        for fd in fds[1:]:
            tensor = read_tensor(fd, entry, len(raw))  # (a mixed-dtype add is several times slower)
            total += BUFFERS.get("converted", tensor.numel(), torch.float32).view(tensor.shape).copy_(tensor)
        data = total.to(DTYPES[entry["dtype"]]).reshape(-1).view(torch.uint8).numpy()
        done = 0
        while done < data.nbytes:
            done += os.pwrite(out_fd, memoryview(data)[done:], len(raw) + entry["data_offsets"][0] + done)
    for fd in fds + [out_fd]:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((args.models[0] / "model.safetensors.index.json").read_text())
    for file in sorted(set(index["weight_map"].values())):
        merge_shard(file, args.models, args.out_dir)
    shutil.copy(args.models[0] / "model.safetensors.index.json", args.out_dir)
    shutil.copy(args.models[0] / "config.json", args.out_dir)


if __name__ == "__main__":
    main()
