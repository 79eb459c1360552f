"""Triton repository for a Hugging Face checkpoint served by TensorRT-LLM 1.x's PyTorch backend.

The layout of the backend's ``llmapi`` models: one Python model ``tensorrt_llm``
whose ``1/model.yaml`` holds the ``LLM(...)`` arguments. The checkpoint is loaded
as it is (``sq-export --target trtllm-hf`` writes one); there is no engine to build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from sqdeploy.core.errors import SqDeployError
from sqdeploy.engines.triton.common import (
    TritonOptions,
    install_python_model,
    launch_command,
    tokenizer_files,
    write_config,
    write_launch_script,
)
from sqdeploy.engines.triton.schema import parameters, tensor

SAMPLING = (("max_tokens", "TYPE_INT32"), ("temperature", "TYPE_FP32"), ("top_k", "TYPE_INT32"),
            ("top_p", "TYPE_FP32"), ("seed", "TYPE_UINT64"))


def check_hf_checkpoint(ckpt: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{ckpt}/config.json is missing or unreadable ({exc})") from None
    if (cfg.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        raise SqDeployError(f"{ckpt} is an sq-deploy quantized directory (compressed-tensors), which TensorRT-LLM's PyTorch "
                            "backend does not load; export it with --target trtllm-hf first")
    if not any(ckpt.glob("*.safetensors")):
        raise SqDeployError(f"{ckpt} has no safetensors weights; pass the --out of sq-export --target trtllm-hf")
    return cfg


def write_llmapi_repo(ckpt: Path, repo: Path, o: TritonOptions, final_repo: Path, tp: int = 1) -> dict[str, Any]:
    check_hf_checkpoint(ckpt)
    tokenizer_files(ckpt, o.tokenizer)  # the LLM API reads the checkpoint's own tokenizer
    model_path = o.engine_path or str(ckpt.resolve())
    inputs = [tensor("text_input", "TYPE_STRING", [-1]), tensor("streaming", "TYPE_BOOL", [1], optional=True)]
    inputs += [tensor(f"sampling_param_{k}", t, [1], optional=True) for k, t in SAMPLING]
    config = {
        "name": "tensorrt_llm", "backend": "python", "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": o.streaming}, "input": inputs,
        "output": [tensor("text_output", "TYPE_STRING", [-1]), tensor("finish_reason", "TYPE_STRING", [-1])],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": parameters({"model_yaml": "model.yaml"}),
    }
    write_config(repo / "tensorrt_llm", config)
    install_python_model(repo / "tensorrt_llm", "llmapi")
    settings = {
        "model": model_path, "backend": "pytorch", "tensor_parallel_size": tp, "pipeline_parallel_size": 1,
        "kv_cache_config": {"free_gpu_memory_fraction": o.kv_cache_fraction},
        "max_batch_size": o.max_batch_size or 64,
        "triton_config": {"max_batch_size": 0, "decoupled": o.streaming},
    }
    (repo / "tensorrt_llm" / "1" / "model.yaml").write_text(
        "# LLM(...) arguments for TensorRT-LLM's LLM API (written by sq-build)\n" + yaml.safe_dump(settings, sort_keys=False))
    command = launch_command(final_repo.resolve())  # the LLM API starts its own tensor-parallel workers
    write_launch_script(repo, command)
    return {"kind": "trtllm-hf", "models": ["tensorrt_llm"], "model": model_path, "tensor_parallel_size": tp,
            "decoupled": o.streaming, "launch": command, "entry_model": "tensorrt_llm",
            "endpoint": "generate_stream" if o.streaming else "generate"}
