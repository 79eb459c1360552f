"""A small ONNX graph builder: unique names, constants, and initializers that can stream to disk.

The decoder graph of a 1B-parameter model holds several GB of weights; protobuf
cannot serialise more than 2 GB, and building the whole proto in memory would double
the peak. :class:`TensorStore` therefore writes each large initializer straight into
``model.onnx.data`` (aligned, as ONNX Runtime memory-maps it) when external data is
on, and keeps it inline otherwise, so the graph code never cares which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXTERNAL_DATA = "model.onnx.data"
ALIGN = 4096  # external tensors start on a page boundary (mmap-friendly)
SMALL = 1024  # bytes: tensors this small always stay inline

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class TensorStore:
    """Initializers kept inline or appended to one external data file."""

    def __init__(self, out_dir: Path | None, external: bool):
        self.external = external and out_dir is not None
        self.path = None if out_dir is None else Path(out_dir) / EXTERNAL_DATA
        self._file = open(self.path, "wb") if self.external else None
        self.offset = 0
        self.nbytes = 0

    def make(self, name: str, data_type: int, dims: Sequence[int], raw: bytes) -> TensorProto:
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        self.nbytes += len(raw)
        if self._file is None or len(raw) <= SMALL:
            t.raw_data = raw
            return t
        pad = (-self.offset) % ALIGN
        self._file.write(b"\0" * pad)
        self.offset += pad
        self._file.write(raw)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", EXTERNAL_DATA), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(raw)
        return t

    def array(self, name: str, a: np.ndarray) -> TensorProto:
        a = np.ascontiguousarray(a)
        return self.make(name, NP_TO_ONNX[a.dtype], a.shape, a.tobytes())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class GraphBuilder:
    """Collects nodes and initializers; every helper returns the name of its output."""

    def __init__(self, opset: int, store: TensorStore):
        self.opset, self.store = opset, store
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.domains: set[str] = set()
        self._count: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs) -> str | list[str]:
        """Add one node; ``""`` in ``inputs`` skips an optional input; ``outputs`` is a count or the exact names."""
        base = hint or op_type
        if isinstance(outputs, int):
            names = [self.fresh(f"{base}/out{k}" if outputs > 1 else base) for k in range(outputs)]
        else:
            names = [n if n == "" else self.fresh(n) for n in outputs]
        node = helper.make_node(op_type, list(inputs), names, name=self.fresh(f"{base}/{op_type}"), domain=domain or None,
                                **{k: v for k, v in attrs.items() if v is not None})
        self.nodes.append(node)
        if domain:
            self.domains.add(domain)
        return names[0] if len(names) == 1 else names

    def initializer(self, name: str, a: np.ndarray) -> str:
        name = self.fresh(name)
        self.initializers.append(self.store.array(name, a))
        return name

    def raw_initializer(self, name: str, data_type: int, dims: Sequence[int], raw: bytes) -> str:
        name = self.fresh(name)
        self.initializers.append(self.store.make(name, data_type, dims, raw))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, shared by every node that asks for the same value."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer("const", a)
        return self._consts[key]

    # ops whose signature changed across opsets
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 1, hint: str | None = None) -> str:
        if self.opset >= 18 or op_type == "ReduceSum" and self.opset >= 13:
            return self.op(op_type, [x, self.const(list(axes))], hint, keepdims=keepdims)
        return self.op(op_type, [x], hint, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int], hint: str | None = None) -> str:
        return self.op("Unsqueeze", [x, self.const(list(axes))], hint)

    def reshape(self, x: str, shape: Sequence[int] | str, hint: str | None = None) -> str:
        target = shape if isinstance(shape, str) else self.const(list(shape))
        return self.op("Reshape", [x, target], hint)

    def dim(self, x: str, axis: int, hint: str | None = None) -> str:
        """Size of one axis as an int64 tensor of shape [1]."""
        return self.op("Shape", [x], hint, start=axis, end=axis + 1)

    def model(self, inputs: list, outputs: list, name: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="sq-deploy")
        model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        helper.set_model_props(model, metadata)
        return model


def float_type(dtype: str) -> tuple[int, type]:
    """ONNX element type and numpy dtype of the graph's float tensors."""
    return (TensorProto.FLOAT16, np.float16) if dtype == "float16" else (TensorProto.FLOAT, np.float32)


def to_numpy(t) -> np.ndarray:
    """A torch tensor (or array) as a numpy array, without pickle or copies where possible."""
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy()
    return np.asarray(t)


__all__ = ["EXTERNAL_DATA", "GraphBuilder", "TensorStore", "float_type", "to_numpy", "numpy_helper"]
