"""The ONNX export directory contract: its file names, manifest, graph interface and session file.

This module is the one definition every reader uses: the export's writer, ``sq-eval``'s
reader, the engine builders (``engines/onnxruntime.py``, ``engines/tensorrt.py``), the
Triton repositories and the runtime's ONNX Runtime backend. :func:`is_onnx_dir` says
whether a directory is an export (or an ONNX Runtime engine made from one),
:func:`read_manifest` validates ``sqdeploy-onnx.json``, and :func:`read_session` reads
the ``session.json`` of an ONNX Runtime engine directory.

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

META = "sqdeploy-onnx.json"  # the manifest
GRAPH = "model.onnx"
META_FORMAT = "sqdeploy.onnx"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
# manifest fields every reader relies on, with their JSON types (ints must be >= 1)
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "num_layers": int, "num_heads": int, "num_kv_heads": int, "head_dim": int, "vocab_size": int, "max_positions": int,
    "dtype": str, "variant": str, "inputs": list, "outputs": list, "quantization": (dict, type(None)),
}
REQUIRED_META = tuple(REQUIRED_FIELDS)
# files other ONNX tools (Optimum, ONNX Runtime GenAI) read beside the graph, written from the manifest
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
GENAI_CONFIG = "genai_config.json"
COMPANIONS = (HF_CONFIG, GENERATION_CONFIG, GENAI_CONFIG)
# an ONNX Runtime engine directory (sq-build --engine onnxruntime): the session it must be loaded with
SESSION = "session.json"
ENGINE_FORMAT = "sqdeploy.ort-engine"
SESSION_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
SESSION_MODES = ("sequential", "parallel")
SESSION_FIELDS = ("execution_provider", "graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads",
                  "execution_mode", "provider_options")
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
        self.meta = read_manifest(self.path, verify=False)  # verified just above
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


def is_onnx_dir(path: str | Path) -> bool:
    """An ONNX export, or an ONNX Runtime engine directory made from one: the manifest beside a graph."""
    p = Path(path)
    return (p / META).exists() and any(p.glob("*.onnx"))


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """``sqdeploy-onnx.json`` of an export, validated; ``verify`` also checks the files recorded at export
    (an ONNX Runtime engine directory holds a re-optimised graph, so the runtime reads its manifest unverified)."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.exists():
        raise SqDeployError(f"{path} is not an sq-deploy ONNX export ({META} is missing); export one with sq-export --target onnx")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{meta_file} is unreadable ({exc}); re-export the model") from None
    if verify:
        from sqdeploy.core.integrity import verify_recorded_files

        verify_recorded_files(path)
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise SqDeployError(f"{meta_file} is not an sq-deploy ONNX description (format {got!r}); re-export with sq-export --target onnx")
    if not isinstance(meta.get("format_version", 0), int) or meta.get("format_version", 0) > FORMAT_VERSION:
        raise SqDeployError(f"{path} was written by a newer sq-deploy (ONNX format {meta['format_version']}); upgrade sq-deploy")
    _check_fields(meta_file, meta)
    if not (path / meta.get("model_file", GRAPH)).exists():
        raise SqDeployError(f"{path / meta.get('model_file', GRAPH)} is missing; the export is incomplete, re-export it")
    return meta


def _check_fields(meta_file: Path, meta: dict[str, Any]) -> None:
    """An edited description fails here with its field named, not later with a KeyError."""
    for key, kind in REQUIRED_FIELDS.items():
        value = meta.get(key)
        if key not in meta or not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise SqDeployError(f"{meta_file}: field '{key}' is missing or invalid ({value!r}); re-export the model")
    if isinstance(meta["quantization"], dict) and not isinstance(meta["quantization"].get("recipe"), str):
        raise SqDeployError(f"{meta_file}: field 'quantization.recipe' is missing or invalid; re-export the model")
    if meta["dtype"] not in DTYPES:
        raise SqDeployError(f"{meta_file}: field 'dtype' is {meta['dtype']!r}, not float16 or float32; re-export the model")
    if len(meta["inputs"]) != 3 + 2 * meta["num_layers"] or len(meta["outputs"]) != 1 + 2 * meta["num_layers"]:
        raise SqDeployError(f"{meta_file}: 'num_layers' ({meta['num_layers']}) does not match its inputs and outputs; "
                            "re-export the model")


def read_session(path: str | Path) -> dict[str, Any] | None:
    """The session settings of an ONNX Runtime engine directory (the ``SESSION_FIELDS`` of ``session.json``
    that it sets), or None for a plain export; unknown levels or modes are refused."""
    f = Path(path) / SESSION
    if not f.exists():
        return None
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{f} cannot be read ({exc}); rebuild with sq-build --engine onnxruntime") from None
    if not isinstance(raw, dict):
        raise SqDeployError(f"{f} is not a JSON object; rebuild with sq-build --engine onnxruntime")
    if raw.get("graph_optimization_level", SESSION_LEVELS[-1]) not in SESSION_LEVELS or raw.get("execution_mode", "sequential") not in SESSION_MODES:
        raise SqDeployError(f"{f}: unknown optimisation level or execution mode; rebuild with sq-build --engine onnxruntime")
    return {k: raw[k] for k in SESSION_FIELDS if k in raw}


def session_graph(path: str | Path) -> str | None:
    """The graph an engine directory's ``session.json`` names (None: no session file, or none named)."""
    f = Path(path) / SESSION
    try:
        return json.loads(f.read_text()).get("model") if f.exists() else None
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # reported with its remedy when the session settings are read


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
