"""``sq-export --target onnx``: QuantizedModel directory -> model.onnx + sqdeploy-onnx.json + tokenizer,
and the files Optimum and ONNX Runtime GenAI read (config.json, generation_config.json, genai_config.json).

The graph's weights always stream into ``model.onnx.data`` first (memory stays near
one layer's worth of numpy arrays); when the whole graph fits under protobuf's
2 GB and external data was not asked for, they are moved back inline and the data
file removed, so small models remain a single file.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model

from sqdeploy.core.progress import Progress
from sqdeploy.core.report import markdown_table
from sqdeploy.formats.onnx.builder import EXTERNAL_DATA, TensorStore
from sqdeploy.formats.onnx.companions import write_companions
from sqdeploy.formats.onnx.contract import GRAPH, META, META_FORMAT
from sqdeploy.formats.onnx.graph import DecoderGraph
from sqdeploy.formats.onnx.meta import build_meta
from sqdeploy.formats.onnx.options import OnnxExportOptions, OnnxOptions, resolve
from sqdeploy.formats.target import WriteContext
from sqdeploy.quantize.qmodel import QuantizedModel, is_quantized_dir

INLINE_LIMIT = 1_900_000_000  # bytes of initializers kept inside model.onnx (protobuf's hard limit is 2 GiB)
REFERENCE_COPY = "quantized"


def write_onnx(qdir: Path, out: Path, opts: OnnxOptions, reference: str | None, progress: bool = True,
               shown_as: Path | None = None) -> dict:
    """Write the export into ``out`` (an empty directory; ``shown_as`` its final name); returns the report."""
    t0 = time.perf_counter()
    qm = QuantizedModel(qdir)
    store = TensorStore(out, external=True)
    try:
        with Progress(qm.config.num_layers, f"ONNX graph ({opts.variant}, {opts.dtype})", progress) as bar:
            built = DecoderGraph(qm, opts, store).build({"sqdeploy.format": META_FORMAT}, bar)
    finally:
        store.close()
    external = opts.external_data or store.nbytes > INLINE_LIMIT
    if not external:
        load_external_data_for_model(built.model, str(out))
        (out / EXTERNAL_DATA).unlink()
    onnx.save_model(built.model, str(out / GRAPH))
    onnx.checker.check_model(str(out / GRAPH))
    for f in qm.tokenizer_files():
        shutil.copy(f, out / f.name)
    meta = build_meta(qm, opts, built.quantized_matmuls, built.fused, external, reference)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    write_companions(out, qm.hf_config, meta, qm.path)
    ops = _op_counts(built.model)
    report = {"meta": meta, "op_counts": ops, "bytes": store.nbytes, "seconds": round(time.perf_counter() - t0, 2)}
    report["summary"] = _summary(shown_as or out, meta, ops, store.nbytes, report["seconds"])
    return report


def write(qdir: Path, out: Path, request: OnnxExportOptions, context: WriteContext) -> dict:
    """Target.write: keeps a copy of a temporary quantized directory as the checker's reference."""
    qm = QuantizedModel(qdir)
    opts = resolve(request, qm.scheme, qm.config, str(qm.dtype).replace("torch.", ""))
    if is_quantized_dir(context.source):
        reference = str(Path(context.source).resolve())
    elif not request.reference_copy:
        reference = None
    else:
        shutil.copytree(qdir, out / REFERENCE_COPY)
        reference = REFERENCE_COPY
    return write_onnx(qdir, out, opts, reference, progress=context.progress, shown_as=context.shown_as)


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _summary(out: Path, meta: dict, ops: dict[str, int], nbytes: int, seconds: float) -> str:
    q = meta["quantization"]
    keys = ("QuantizeLinear", "DequantizeLinear", "MatMulNBits", "MatMulInteger", "MatMul", "GroupQueryAttention")
    rows = [
        ["graph", f"{out / GRAPH}" + (f" + {EXTERNAL_DATA}" if meta["external_data"] else "")],
        ["variant / dtype / opset", f"{meta['variant']} / {meta['dtype']} / {meta['opset']}"],
        ["recipe", f"{q['recipe']} ({q['quantized_linears']} quantized linears in {q['quantized_matmuls']} MatMuls)"],
        ["int4 format", str(meta["int4_format"])],
        ["ops", ", ".join(f"{k} {ops[k]}" for k in keys if k in ops)],
        ["weights", f"{nbytes / 2**20:.1f} MiB"],
        ["reference", str(meta["reference"])],
    ]
    return "\n" + markdown_table(["ONNX export", ""], rows) + f"\nwrote {out} (ONNX graph: {seconds:.1f} s)"
