"""Triton repository for TensorRT-LLM engines: the layout of NVIDIA's tensorrtllm_backend.

``preprocessing`` (tokenizer, Python) -> ``tensorrt_llm`` (the C++ ``tensorrtllm``
backend: in-flight fused batching over the paged KV cache, streaming when decoupled)
-> ``postprocessing`` (detokenizer, Python), wired by ``ensemble``. Tensor names and
types are those of the backend's own models, so clients written for NVIDIA's
repository (``text_input``, ``max_tokens``, ``stream`` ...) work unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.engines.triton.common import (
    TritonOptions,
    copy_tokenizer,
    install_python_model,
    launch_command,
    tokenizer_files,
    write_config,
    write_launch_script,
)
from sqdeploy.engines.triton.schema import parameters, scalar_input, tensor

# (ensemble input, tensorrt_llm input, Triton type) passed straight through
SAMPLING_INPUTS = (
    ("stream", "streaming", "TYPE_BOOL"),
    ("temperature", "temperature", "TYPE_FP32"),
    ("top_k", "runtime_top_k", "TYPE_INT32"),
    ("top_p", "runtime_top_p", "TYPE_FP32"),
    ("repetition_penalty", "repetition_penalty", "TYPE_FP32"),
    ("seed", "seed", "TYPE_UINT64"),
)


def read_engine_dir(engine_dir: Path) -> dict[str, Any]:
    """config.json written by trtllm-build, after checking every rank's engine is there."""
    try:
        cfg = json.loads((engine_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{engine_dir}/config.json is missing or unreadable ({exc}); pass the --out of sq-build --engine trtllm") from None
    pretrained = cfg.get("pretrained_config") or {}
    world = int((pretrained.get("mapping") or {}).get("world_size", 1))
    missing = [f"rank{r}.engine" for r in range(world) if not (engine_dir / f"rank{r}.engine").exists()]
    if missing:
        raise SqDeployError(f"{engine_dir} lacks {', '.join(missing)} (world size {world}); rebuild with sq-build --engine trtllm")
    return cfg


def _preprocessing(batch: int, o: TritonOptions) -> dict[str, Any]:
    return {
        "name": "preprocessing", "backend": "python", "max_batch_size": batch, "dynamic_batching": {},
        "input": [tensor("QUERY", "TYPE_STRING", [1]), tensor("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1]),
                  tensor("END_ID", "TYPE_INT32", [1], optional=True), tensor("PAD_ID", "TYPE_INT32", [1], optional=True)],
        "output": [tensor("INPUT_ID", "TYPE_INT32", [-1]), tensor("REQUEST_INPUT_LEN", "TYPE_INT32", [1]),
                   tensor("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1]), tensor("OUT_END_ID", "TYPE_INT32", [1]),
                   tensor("OUT_PAD_ID", "TYPE_INT32", [1])],
        "parameters": parameters({"tokenizer_dir": "tokenizer", "add_special_tokens": True}),
        "instance_group": [{"count": o.instances, "kind": "KIND_CPU"}],
    }


def _postprocessing(batch: int, o: TritonOptions) -> dict[str, Any]:
    return {
        "name": "postprocessing", "backend": "python", "max_batch_size": batch, "dynamic_batching": {},
        "input": [tensor("TOKENS_BATCH", "TYPE_INT32", [-1, -1]), tensor("SEQUENCE_LENGTH", "TYPE_INT32", [-1])],
        "output": [tensor("OUTPUT", "TYPE_STRING", [-1])],
        "parameters": parameters({"tokenizer_dir": "tokenizer", "skip_special_tokens": True}),
        "instance_group": [{"count": o.instances, "kind": "KIND_CPU"}],
    }


def _tensorrt_llm(batch: int, engine_path: str, paged_context: bool, o: TritonOptions) -> dict[str, Any]:
    inputs = [tensor("input_ids", "TYPE_INT32", [-1], allow_ragged_batch=True),
              scalar_input("input_lengths", "TYPE_INT32", optional=False),
              scalar_input("request_output_len", "TYPE_INT32", optional=False),
              scalar_input("end_id", "TYPE_INT32"), scalar_input("pad_id", "TYPE_INT32")]
    inputs += [scalar_input(name, dtype) for _, name, dtype in SAMPLING_INPUTS]
    params = {
        "gpt_model_type": "inflight_fused_batching", "gpt_model_path": engine_path, "max_beam_width": 1,
        "batch_scheduler_policy": o.batch_scheduler_policy, "kv_cache_free_gpu_mem_fraction": o.kv_cache_fraction,
        "enable_chunked_context": paged_context, "enable_kv_cache_reuse": paged_context,
        "exclude_input_in_output": True, "normalize_log_probs": True, "decoding_mode": "top_k_top_p",
        "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker",
    }
    return {
        "name": "tensorrt_llm", "backend": "tensorrtllm", "max_batch_size": batch,
        "model_transaction_policy": {"decoupled": o.streaming},
        "dynamic_batching": {"preferred_batch_size": [batch], "max_queue_delay_microseconds": str(o.max_queue_delay_us),
                             "default_queue_policy": {"max_queue_size": 0}},
        "input": inputs,
        "output": [tensor("output_ids", "TYPE_INT32", [-1, -1]), tensor("sequence_length", "TYPE_INT32", [-1])],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": parameters(params),
    }


def _ensemble(batch: int) -> dict[str, Any]:
    inputs = [tensor("text_input", "TYPE_STRING", [1]), tensor("max_tokens", "TYPE_INT32", [1]),
              tensor("end_id", "TYPE_INT32", [1], optional=True), tensor("pad_id", "TYPE_INT32", [1], optional=True)]
    inputs += [tensor(name, dtype, [1], optional=True) for name, _, dtype in SAMPLING_INPUTS]
    llm_inputs = {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN", "request_output_len": "_REQUEST_OUTPUT_LEN",
                  "end_id": "_END_ID", "pad_id": "_PAD_ID", **{trt: ens for ens, trt, _ in SAMPLING_INPUTS}}
    steps = [
        {"model_name": "preprocessing", "model_version": -1,
         "input_map": {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "END_ID": "end_id", "PAD_ID": "pad_id"},
         "output_map": {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
                        "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN", "OUT_END_ID": "_END_ID", "OUT_PAD_ID": "_PAD_ID"}},
        {"model_name": "tensorrt_llm", "model_version": -1, "input_map": llm_inputs,
         "output_map": {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}},
        {"model_name": "postprocessing", "model_version": -1,
         "input_map": {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
         "output_map": {"OUTPUT": "text_output"}},
    ]
    return {"name": "ensemble", "platform": "ensemble", "max_batch_size": batch, "input": inputs,
            "output": [tensor("text_output", "TYPE_STRING", [-1])], "ensemble_scheduling": {"step": steps}}


def write_trtllm_repo(engine_dir: Path, repo: Path, o: TritonOptions, final_repo: Path) -> dict[str, Any]:
    cfg = read_engine_dir(engine_dir)
    build = cfg.get("build_config") or {}
    world = int(((cfg.get("pretrained_config") or {}).get("mapping") or {}).get("world_size", 1))
    engine_max = int(build.get("max_batch_size") or 64)
    batch = o.max_batch_size or engine_max
    if batch > engine_max:
        raise SqDeployError(f"--max-batch-size {batch} exceeds the engines' max_batch_size {engine_max}; rebuild the engines or lower it")
    paged_context = bool((build.get("plugin_config") or {}).get("use_paged_context_fmha", True))
    tokenizer = tokenizer_files(engine_dir, o.tokenizer)
    engine_path = o.engine_path or str(engine_dir.resolve())
    for name, config in (("preprocessing", _preprocessing(batch, o)), ("postprocessing", _postprocessing(batch, o))):
        write_config(repo / name, config)
        install_python_model(repo / name, name)
        copy_tokenizer(tokenizer, repo / name / "1" / "tokenizer")
    write_config(repo / "tensorrt_llm", _tensorrt_llm(batch, engine_path, paged_context, o))
    write_config(repo / "ensemble", _ensemble(batch))
    command = launch_command(final_repo.resolve(), world, ("tensorrt_llm",))
    write_launch_script(repo, command)
    return {"kind": "trtllm-engine", "models": ["ensemble", "preprocessing", "tensorrt_llm", "postprocessing"],
            "world_size": world, "max_batch_size": batch, "decoupled": o.streaming, "engine_path": engine_path,
            "launch": command, "endpoint": "generate_stream" if o.streaming else "generate", "entry_model": "ensemble"}
