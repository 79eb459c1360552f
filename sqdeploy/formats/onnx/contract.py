"""The ONNX export directory, as the engine builders read it.

``sq-export --target onnx`` writes ``model.onnx`` (+ ``model.onnx.data``), the
tokenizer files and ``sqdeploy-onnx.json``, which describes the graph: family,
layers, heads, KV heads, head dim, hidden and vocab sizes, dtype, variant
(``tensorrt`` = standard ONNX ops only, ``onnxruntime`` = may use ONNX Runtime
contrib ops), quantization and token ids. The graph's interface is fixed:

=========================== ====== ============================================
``input_ids``               int64  [batch, sequence]
``attention_mask``          int64  [batch, past_sequence + sequence]
``position_ids``            int64  [batch, sequence]
``past_key_values.{i}.key`` float  [batch, kv_heads, past_sequence, head_dim]
(and ``.value``)
``logits``                  float  [batch, sequence, vocab]
``present.{i}.key/.value``  float  [batch, kv_heads, past_sequence + sequence, head_dim]
=========================== ====== ============================================

Everything here reads the graph *without* its weights (external data stays on disk),
so it is cheap for a 70B export too.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError

META = "sqdeploy-onnx.json"
GRAPH = "model.onnx"
META_FORMAT = "sqdeploy.onnx"
REQUIRED_META = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "dtype")
# the dimension roles of the contract, by input name pattern and axis
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: int64, float32, float16
    dims: tuple[int | str, ...]  # int for fixed axes, the symbolic name for dynamic ones

    def roles(self) -> tuple[str | int, ...]:
        """Each axis as a contract role (batch, sequence, ...) or its fixed size."""
        n = self.name
        if n in ("input_ids", "position_ids"):
            roles: tuple = (BATCH, SEQUENCE)
        elif n == "attention_mask":
            roles = (BATCH, TOTAL)
        elif n.startswith("past_key_values."):
            roles = (BATCH, self.dims[1], PAST, self.dims[3])
        elif n == "logits":
            roles = (BATCH, SEQUENCE, self.dims[2])
        elif n.startswith("present."):
            roles = (BATCH, self.dims[1], TOTAL, self.dims[3])
        else:
            raise SqDeployError(f"graph tensor '{n}' is not part of the sq-deploy ONNX interface")
        if len(roles) != len(self.dims):
            raise SqDeployError(f"graph tensor '{n}' has rank {len(self.dims)}, the ONNX interface expects {len(roles)}")
        return roles


def _dtype_name(elem_type: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def _spec(value_info) -> TensorSpec:
    t = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    return TensorSpec(value_info.name, _dtype_name(t.elem_type), dims)


class OnnxExport:
    """An ONNX export directory: its description, interface, ops and weight size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SqDeployError(f"ONNX directory {self.path} does not exist; pass the --out of 'sq-export --target onnx'")
        self.graph_path = self.path / GRAPH
        if not self.graph_path.exists():
            raise SqDeployError(f"{self.path} has no {GRAPH}; pass the --out of 'sq-export --target onnx'")
        from sqdeploy.core.integrity import verify_recorded_files

        verify_recorded_files(self.path)
        self.meta = _read_meta(self.path / META)
        model = read_graph(self.graph_path)
        g = model.graph
        self.opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        self.inputs = [_spec(v) for v in g.input if v.name not in {i.name for i in g.initializer}]
        self.outputs = [_spec(v) for v in g.output]
        self.op_counts = Counter(f"{n.domain}::{n.op_type}" if n.domain not in STANDARD_DOMAINS else n.op_type for n in g.node)
        self.initializer_bytes = sum(_initializer_bytes(t) for t in g.initializer)
        self.external_data = sorted({e.value for t in g.initializer for e in t.external_data if e.key == "location"})
        for name in self.external_data:
            contained_file(self.path, name, f"{self.graph_path}: external data")
        self._check_interface()

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    @property
    def variant(self) -> str:
        return str(self.meta.get("variant", "tensorrt"))

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def nonstandard_ops(self) -> list[str]:
        return sorted(op for op in self.op_counts if "::" in op)

    def quantize_ops(self) -> dict[str, int]:
        return {k: v for k, v in self.op_counts.items() if k.split("::")[-1] in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits")}

    def kv_bytes_per_token(self) -> int:
        itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[self.input("past_key_values.0.key").dtype]
        return 2 * self.num_layers * int(self.meta["num_kv_heads"]) * int(self.meta["head_dim"]) * itemsize

    def companion_files(self) -> list[Path]:
        """config.json, generation_config.json, genai_config.json: what Optimum and ONNX Runtime GenAI read."""
        from sqdeploy.formats.onnx.companions import COMPANIONS

        return [self.path / n for n in COMPANIONS if (self.path / n).exists()]

    def tokenizer_files(self) -> list[Path]:
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
        return [self.path / n for n in names if (self.path / n).exists()]

    def _check_interface(self) -> None:
        names_in = {s.name for s in self.inputs}
        names_out = {s.name for s in self.outputs}
        want_in = {"input_ids", "attention_mask", "position_ids"}
        want_out = {"logits"}
        for i in range(self.num_layers):
            want_in |= {f"past_key_values.{i}.key", f"past_key_values.{i}.value"}
            want_out |= {f"present.{i}.key", f"present.{i}.value"}
        missing = sorted(want_in - names_in) + sorted(want_out - names_out)
        extra = sorted(names_in - want_in) + sorted(names_out - want_out)
        if missing or extra:
            what = "; ".join(x for x in (missing and f"missing {', '.join(missing[:4])}", extra and f"unexpected {', '.join(extra[:4])}") if x)
            raise SqDeployError(f"{self.graph_path}: the graph does not have the sq-deploy ONNX interface ({what}); re-export it with sq-export --target onnx")
        for s in self.inputs + self.outputs:
            s.roles()  # raises on a wrong rank or a foreign tensor
        for name in ("input_ids", "attention_mask", "position_ids"):
            if self.input(name).dtype != "int64":
                raise SqDeployError(f"{self.graph_path}: input '{name}' is {self.input(name).dtype}, the interface needs int64")
        kv = self.input("past_key_values.0.key")
        if kv.dims[1] != int(self.meta["num_kv_heads"]) or kv.dims[3] != int(self.meta["head_dim"]):
            raise SqDeployError(
                f"{self.graph_path}: past_key_values.0.key has dims {list(kv.dims)} but {META} says "
                f"{self.meta['num_kv_heads']} KV heads of {self.meta['head_dim']}; the directory is inconsistent, re-export it"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "family": self.meta.get("family"), "variant": self.variant, "dtype": self.dtype,
            "layers": self.num_layers, "quantization": self.meta.get("quantization"),
            "weights_bytes": self.initializer_bytes, "quantize_ops": self.quantize_ops(),
            "nonstandard_ops": self.nonstandard_ops(), "opset": self.opset,
        }


def read_graph(path: Path):
    """The graph without its external weights; a truncated or foreign file is one line, not a traceback."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a truncated or foreign file
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SqDeployError(f"{path} is not a readable ONNX model ({reason}); it may be truncated: re-export it") from None


def contained_file(base: Path, name: str, what: str) -> Path:
    """``base / name`` if it is a plain relative name that stays inside ``base`` (symlinks resolved).

    A graph names its external-data files itself; a crafted one could name ``../../x``
    or ``/etc/passwd`` to make a copier read or overwrite files elsewhere.
    """
    import os

    if not name or os.path.isabs(name) or "\0" in name:
        raise SqDeployError(f"{what} location {name!r} is not a relative file name inside {base}; refusing it")
    root = os.path.realpath(base)
    real = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, real]) != root or real == root:
        raise SqDeployError(f"{what} location {name!r} leads outside {base}; refusing it")
    return base / name


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SqDeployError(f"{path} is missing; the directory is not an sq-deploy ONNX export (sq-export --target onnx writes it)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{path} is unreadable ({exc}); re-export the model") from None
    if meta.get("format") != META_FORMAT:
        raise SqDeployError(f"{path}: format is {meta.get('format')!r}, expected '{META_FORMAT}'; re-export the model")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise SqDeployError(f"{path} lacks {', '.join(missing)}; re-export the model with this sq-deploy")
    return meta


def _initializer_bytes(t) -> int:
    """Bytes of one initializer, inline or external, without reading external data."""
    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    if t.raw_data:
        return len(t.raw_data)
    import numpy as np

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    itemsize = np.dtype(_dtype_name(t.data_type)).itemsize if t.data_type not in (22, 21) else 0.5  # int4 / uint4 pack 2 per byte
    return int(n * itemsize)
