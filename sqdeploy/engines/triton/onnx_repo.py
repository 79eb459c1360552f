"""Triton repository for an ONNX export (or an ONNX Runtime engine directory).

Two models: ``decoder``, the graph itself on Triton's ``onnxruntime`` backend (its
inputs and outputs declared exactly as the graph has them), and ``generate``, a
decoupled Python model that runs the generation loop over ``decoder`` through BLS,
feeding each step's ``present.*`` back as ``past_key_values.*`` (the KV cache), and
streams text. The decoder can also be called directly for logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.engines.triton.common import (
    TritonOptions,
    copy_file,
    copy_tokenizer,
    install_python_model,
    launch_command,
    write_config,
    write_launch_script,
)
from sqdeploy.engines.triton.schema import parameters, tensor
from sqdeploy.formats.onnx.contract import GRAPH, OnnxExport, TensorSpec, read_session

TRITON_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                "bfloat16": "TYPE_BF16", "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}


def triton_tensor(spec: TensorSpec) -> dict[str, Any]:
    if spec.dtype not in TRITON_TYPES:
        raise SqDeployError(f"graph tensor '{spec.name}' has type {spec.dtype}, which Triton cannot carry")
    return tensor(spec.name, TRITON_TYPES[spec.dtype], [d if isinstance(d, int) and d > 0 else -1 for d in spec.dims])


def export_device(src: OnnxExport, session: dict | None) -> str:
    """The device an export was made for: an ONNX Runtime engine's provider, else its dtype
    (float32 graphs are the CPU form, float16/bfloat16 the GPU one, as ``sq-export --dtype`` documents)."""
    if session is not None:
        return "gpu" if session.get("execution_provider") == "CUDAExecutionProvider" else "cpu"
    return "cpu" if src.dtype == "float32" else "gpu"


def _decoder_config(src: OnnxExport, session: dict | None, o: TritonOptions, device: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "decoder", "backend": "onnxruntime", "max_batch_size": 0,
        "input": [triton_tensor(s) for s in src.inputs], "output": [triton_tensor(s) for s in src.outputs],
        "instance_group": [{"count": 1, "kind": "KIND_GPU" if device == "gpu" else "KIND_CPU"}],
    }
    if session is not None:  # already optimised offline: the backend must not optimise again
        config["optimization"] = {"graph": {"level": 2}}
        config["parameters"] = parameters({"intra_op_thread_count": session.get("intra_op_num_threads", 0),
                                           "inter_op_thread_count": session.get("inter_op_num_threads", 0),
                                           "execution_mode": 1 if session.get("execution_mode") == "parallel" else 0})
    elif device == "gpu":
        config["optimization"] = {"graph": {"level": 1}}  # basic + extended fusions; layout rewrites are CPU-only
    return config


def _generate_config(src: OnnxExport, o: TritonOptions) -> dict[str, Any]:
    eos = src.meta.get("eos_token_id")
    eos = ",".join(str(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    kv = src.input("past_key_values.0.key")
    params = {"decoder_model": "decoder", "tokenizer_dir": "tokenizer", "num_layers": src.num_layers,
              "num_kv_heads": kv.dims[1], "head_dim": kv.dims[3], "kv_dtype": kv.dtype, "eos_token_id": eos,
              "max_seq_len": src.meta.get("max_positions") or 4096, "default_max_tokens": o.default_max_tokens}
    optional = [("max_tokens", "TYPE_INT32"), ("temperature", "TYPE_FP32"), ("top_k", "TYPE_INT32"),
                ("seed", "TYPE_UINT64"), ("stream", "TYPE_BOOL")]
    return {
        "name": "generate", "backend": "python", "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [tensor("text_input", "TYPE_STRING", [1])] + [tensor(n, t, [1], optional=True) for n, t in optional],
        "output": [tensor("text_output", "TYPE_STRING", [1])],
        "instance_group": [{"count": o.instances, "kind": "KIND_CPU"}],
        "parameters": parameters(params),
    }


def write_onnx_repo(src_dir: Path, repo: Path, o: TritonOptions, final_repo: Path) -> dict[str, Any]:
    src = OnnxExport(src_dir)
    session = read_session(src_dir)
    if session is not None:
        if o.device == "gpu" and session.get("execution_provider") != "CUDAExecutionProvider":
            raise SqDeployError(f"{src_dir} was optimised for {session.get('execution_provider')}; pass the ONNX export "
                                "directory itself for a GPU repository, or --device cpu")
    tokenizer = src.tokenizer_files() if o.tokenizer is None else [p for p in (o.tokenizer / f for f in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")) if p.exists()]
    if not tokenizer:
        raise SqDeployError(f"no tokenizer files in {o.tokenizer or src_dir}; pass --tokenizer HF_MODEL_DIR")
    device = o.device or export_device(src, session)
    write_config(repo / "decoder", _decoder_config(src, session, o, device))
    copy_file(src.graph_path, repo / "decoder" / "1" / GRAPH)
    for name in src.external_data:
        copy_file(src_dir / name, repo / "decoder" / "1" / name)
    write_config(repo / "generate", _generate_config(src, o))
    install_python_model(repo / "generate", "onnx_generate")
    copy_tokenizer(tokenizer, repo / "generate" / "1" / "tokenizer")
    command = launch_command(final_repo.resolve())
    write_launch_script(repo, command)
    return {"kind": "onnx", "models": ["generate", "decoder"], "decoupled": True, "launch": command, "device": device,
            "entry_model": "generate", "endpoint": "generate_stream"}
