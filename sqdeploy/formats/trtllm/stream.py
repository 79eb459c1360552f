"""Rank files written layer by layer, so host memory holds one layer, not the whole checkpoint.

TensorRT-LLM's checkpoint is one ``rank{r}.safetensors`` per rank. ``save_file`` needs every
tensor of a file in memory at once (and copies them into one buffer besides), which for a
7B model at tp 8 is the whole 6.7 GB checkpoint. Here each rank's file is laid out before
its tensors exist: the embeddings and the first layer give the names, dtypes and shapes,
and every decoder layer of a family has the same tensors as the first with its index
changed. The header is computed exactly as safetensors does (tensors sorted by dtype, in
safetensors' own dtype order read from the installed library, then by name; compact JSON;
padded with spaces to 8 bytes), the file is sized, and each tensor's bytes are written at
their offset as soon as the layer is encoded. The result reads back as any safetensors file;
its tensor section and header equal ``save_file``'s byte for byte (except that
``save_file`` orders the ``__metadata__`` keys at random, and this writes them in order).

:func:`iter_tensors` reads such a file back one tensor at a time (``pread``, no memory map),
for checks that must not hold a whole rank file either.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sqdeploy.core.errors import SqDeployError

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


@functools.lru_cache(maxsize=1)
def dtype_rank() -> dict[str, int]:
    """Position of each dtype in the installed safetensors' file order (0 first): learned by
    writing one element of each, so the layout follows the library rather than a copy of it."""
    from safetensors.torch import save

    data = save({f"t{i}": torch.zeros(1, dtype=d) for i, d in enumerate(ST_DTYPES)})
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {info["dtype"]: i for i, (_, info) in enumerate(order)}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=TORCH_DTYPES[self.dtype]).element_size()
        for d in self.shape:
            n *= d
        return n


def entry_of(name: str, t: torch.Tensor) -> Entry:
    if t.dtype not in ST_DTYPES:
        raise SqDeployError(f"internal error: {name} has dtype {t.dtype}, which the rank files do not store")
    return Entry(name, ST_DTYPES[t.dtype], tuple(t.shape))


def layout(entries: list[Entry], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """safetensors' header (length prefix included) and each tensor's [start, end) in the data section."""
    rank = dtype_rank()
    ordered = sorted(entries, key=lambda e: (rank[e.dtype], e.name.encode()))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for e in ordered:
        if e.name in offsets:
            raise SqDeployError(f"internal error: tensor {e.name} is planned twice")
        offsets[e.name] = (pos, pos + e.nbytes)
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's little-endian bytes as a flat uint8 array (no copy when already contiguous on the CPU)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


class PlannedFile:
    """One safetensors file whose header is written first and whose tensors arrive in any order."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        head, self.offsets = layout(entries, metadata)
        self.data_start = len(head)
        self.size = self.data_start + sum(e.nbytes for e in entries)
        self.missing = set(self.entries)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(self.fd, memoryview(head), 0)
        os.ftruncate(self.fd, self.size)

    def write(self, name: str, t: torch.Tensor) -> None:
        e = self.entries.get(name)
        if e is None or name not in self.missing:
            raise SqDeployError(f"internal error: {self.path.name}: tensor {name} was not planned or is written twice")
        got = entry_of(name, t)
        if got != e:
            raise SqDeployError(f"internal error: {self.path.name}: {name} is {got.dtype}{list(got.shape)}, "
                                f"planned {e.dtype}{list(e.shape)} from the first layer")
        start, _ = self.offsets[name]
        _pwrite_all(self.fd, memoryview(tensor_bytes(t)), self.data_start + start)
        self.missing.discard(name)

    def __del__(self) -> None:  # an export that failed half-way: its temporary directory goes, the descriptor too
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        if self.missing:
            raise SqDeployError(f"internal error: {self.path.name}: {len(self.missing)} planned tensors were never written, "
                                f"e.g. {sorted(self.missing)[0]}")


class RankFiles:
    """``rank{r}.safetensors`` for every rank, filled one decoder layer at a time.

    ``globals_`` (embeddings, final norm, lm_head per rank) are kept until the first layer
    arrives; that layer fixes the plan (its names with the layer index changed, for every
    layer), the files are laid out, and from then on each layer's tensors are written and
    dropped. A later layer with other names, dtypes or shapes is an internal error.
    """

    def __init__(self, out: Path, globals_: list[dict[str, torch.Tensor]], num_layers: int, layer_prefix: str,
                 metadata: dict[str, str] | None = None):
        self.out, self.num_layers, self.prefix, self.metadata = Path(out), num_layers, layer_prefix, metadata
        self.globals: list[dict[str, torch.Tensor]] | None = globals_
        self.files: list[PlannedFile] = []

    def _plan(self, first: list[dict[str, torch.Tensor]] | None) -> None:
        p0 = self.prefix.format(i=0)
        for r, glob in enumerate(self.globals):
            entries = [entry_of(n, t) for n, t in glob.items()]
            for name, t in (first[r] if first is not None else {}).items():
                if not name.startswith(p0):
                    raise SqDeployError(f"internal error: layer tensor {name} lacks the prefix {p0}")
                e = entry_of(name, t)
                entries += [Entry(self.prefix.format(i=i) + name[len(p0):], e.dtype, e.shape) for i in range(self.num_layers)]
            f = PlannedFile(self.out / f"rank{r}.safetensors", entries, self.metadata)
            self.files.append(f)
            for name, t in glob.items():
                f.write(name, t)
        self.globals = None

    def add_layer(self, per_rank: list[dict[str, torch.Tensor]]) -> None:
        if self.globals is not None:
            self._plan(per_rank)
        for f, tensors in zip(self.files, per_rank):
            for name, t in tensors.items():
                f.write(name, t)

    def close(self) -> None:
        if self.globals is not None:  # a model without decoder layers
            self._plan(None)
        for f in self.files:
            f.close()


def read_header(path: str | Path) -> tuple[int, dict]:
    """(start of the data section, header without ``__metadata__``) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file one at a time, in file order (memory: one tensor)."""
    start, header = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = info["data_offsets"]
            buf = bytearray(b - a)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = os.preadv(fd, [view[got:]], start + a + got)
                if n == 0:
                    raise SqDeployError(f"{path}: truncated at tensor {name}; export it again")
                got += n
            dtype = TORCH_DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
            yield name, t.view(dtype).reshape(info["shape"])
    finally:
        os.close(fd)
