"""``sqdeploy-onnx.json``: what an engine builder or server needs to drive the graph without reading it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.formats.onnx.graph import input_names, output_names
from sqdeploy.formats.onnx.options import OnnxOptions
from sqdeploy.quantize.qmodel import QuantizedModel

FORMAT = "sqdeploy.onnx"
FORMAT_VERSION = 1
META = "sqdeploy-onnx.json"
MODEL = "model.onnx"


def quantized_linears(qm: QuantizedModel) -> int:
    return 0 if qm.scheme.is_float else qm.config.num_layers * len(qm.config.linears)


def build_meta(qm: QuantizedModel, opts: OnnxOptions, quantized_matmuls: int, fused: list[list[str]],
               external_data: bool, reference: str | None) -> dict[str, Any]:
    cfg: ModelConfig = qm.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": qm.family.name,
        "architecture": cfg.architecture,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_positions": cfg.max_positions,
        "sliding_window": cfg.sliding_window,
        "position": cfg.position,
        "dtype": opts.dtype,
        "variant": opts.variant,
        "int4_format": opts.int4_format,
        "opset": opts.opset,
        "accuracy_level": opts.accuracy_level if opts.int4_format else None,
        "lm_head": opts.lm_head,
        "quantization": {
            "recipe": qm.recipe.name,
            "scheme": qm.scheme.to_dict(),
            "quantized_linears": quantized_linears(qm),
            "quantized_matmuls": quantized_matmuls if not qm.scheme.is_float else 0,
            "fused_linears": fused,
        },
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "inputs": input_names(cfg),
        "outputs": output_names(cfg),
        "model_file": MODEL,
        "external_data": external_data,
        "reference": reference,
    }


def is_onnx_dir(path: Path) -> bool:
    return (Path(path) / META).exists() and (Path(path) / MODEL).exists()


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META
    if not meta_file.exists():
        raise SqDeployError(f"{path} is not an sq-deploy ONNX export ({META} is missing); export one with sq-export --target onnx")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{meta_file} is unreadable ({exc}); re-export the model") from None
    from sqdeploy.core.integrity import verify_recorded_files

    verify_recorded_files(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SqDeployError(f"{meta_file} is not an sq-deploy ONNX description (format {meta.get('format')!r})")
    if not isinstance(meta.get("format_version", 0), int) or meta.get("format_version", 0) > FORMAT_VERSION:
        raise SqDeployError(f"{path} was written by a newer sq-deploy (ONNX format {meta['format_version']}); upgrade sq-deploy")
    _check_fields(meta_file, meta)
    if not (path / meta.get("model_file", MODEL)).exists():
        raise SqDeployError(f"{path / MODEL} is missing; the export is incomplete, re-export it")
    return meta


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "num_layers": int, "num_heads": int, "num_kv_heads": int, "head_dim": int, "vocab_size": int,
    "dtype": str, "variant": str, "inputs": list, "outputs": list, "quantization": (dict, type(None)),
}


def _check_fields(meta_file: Path, meta: dict[str, Any]) -> None:
    """An edited description fails here with its field named, not later with a KeyError."""
    for key, kind in _FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise SqDeployError(f"{meta_file}: field '{key}' is missing or invalid ({value!r}); re-export the model")
    if isinstance(meta["quantization"], dict) and not isinstance(meta["quantization"].get("recipe"), str):
        raise SqDeployError(f"{meta_file}: field 'quantization.recipe' is missing or invalid; re-export the model")
    if meta["dtype"] not in ("float16", "float32"):
        raise SqDeployError(f"{meta_file}: field 'dtype' is {meta['dtype']!r}, not float16 or float32; re-export the model")
    if len(meta["inputs"]) != 3 + 2 * meta["num_layers"] or len(meta["outputs"]) != 1 + 2 * meta["num_layers"]:
        raise SqDeployError(f"{meta_file}: 'num_layers' ({meta['num_layers']}) does not match its inputs and outputs; "
                            "re-export the model")


def reference_dir(path: Path, meta: dict[str, Any], override: str | Path | None = None) -> Path:
    """The quantized directory the export came from (relative paths are inside the export)."""
    ref = override or meta.get("reference")
    if not ref:
        raise SqDeployError(f"{path}: no reference quantized directory is recorded; pass --reference QDIR")
    ref = Path(ref)
    if not ref.is_absolute() and override is None:
        ref = path / ref
    if not ref.is_dir():
        raise SqDeployError(f"reference quantized directory {ref} does not exist; pass --reference QDIR")
    return ref
