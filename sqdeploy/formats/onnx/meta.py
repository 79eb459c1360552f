"""``sqdeploy-onnx.json`` as the writer fills it in: what an engine builder or server needs to drive the graph
without reading it (its name, format and required fields are the contract's, :mod:`.contract`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.formats.onnx.contract import FORMAT_VERSION, GRAPH, META_FORMAT
from sqdeploy.formats.onnx.graph import input_names, output_names
from sqdeploy.formats.onnx.options import OnnxOptions
from sqdeploy.quantize.qmodel import QuantizedModel


def quantized_linears(qm: QuantizedModel) -> int:
    return 0 if qm.scheme.is_float else qm.config.num_layers * len(qm.config.linears)


def build_meta(qm: QuantizedModel, opts: OnnxOptions, quantized_matmuls: int, fused: list[list[str]],
               external_data: bool, reference: str | None) -> dict[str, Any]:
    cfg: ModelConfig = qm.config
    return {
        "format": META_FORMAT,
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
        "model_file": GRAPH,
        "external_data": external_data,
        "reference": reference,
    }


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
