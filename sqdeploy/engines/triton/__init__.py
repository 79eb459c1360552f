"""Triton Inference Server model repositories for every engine sq-build makes.

``write_repository(src, out, options)`` looks at ``src`` and writes the matching
layout: TensorRT-LLM engines -> tensorrtllm_backend's ensemble; a Hugging Face
(``trtllm-hf``) checkpoint -> the LLM-API model of TensorRT-LLM 1.x; an ONNX export
or ONNX Runtime engine -> an ``onnxruntime`` decoder plus a generation model. Every
repository is written atomically and checked (:mod:`.check`) before it is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.output import atomic_output_dir
from sqdeploy.engines.triton.check import check_repository, report
from sqdeploy.engines.triton.common import TritonOptions
from sqdeploy.formats.onnx.contract import GRAPH, META, is_onnx_dir

__all__ = ["TritonOptions", "check_repository", "detect_source", "write_repository"]


def detect_source(src: Path) -> str:
    """trtllm-engine | onnx | trtllm-hf, from the files the directory holds."""
    if not src.is_dir():
        raise SqDeployError(f"{src} is not a directory; pass an engine directory, an ONNX export or a trtllm-hf checkpoint")
    if is_onnx_dir(src):
        return "onnx"
    if any(src.glob("*.onnx")):
        raise SqDeployError(f"{src} holds an ONNX graph but no {META}; export it with sq-export --target onnx")
    if any(src.glob("rank*.engine")) or (src / "sqdeploy-build.json").exists():
        return "trtllm-engine"
    if any(src.glob("rank*.safetensors")):
        raise SqDeployError(f"{src} is a TensorRT-LLM checkpoint, not engines; build it first: sq-build --engine trtllm {src} --out ENGINE_DIR")
    if (src / "config.json").exists():
        import json

        cfg = json.loads((src / "config.json").read_text())
        if "pretrained_config" in cfg:
            return "trtllm-engine"  # read_engine_dir names the missing engines
        if "architectures" in cfg or "model_type" in cfg:
            return "trtllm-hf"
    raise SqDeployError(f"{src} holds no TensorRT-LLM engines (rank*.engine), ONNX export ({GRAPH} + {META}) or Hugging Face checkpoint")


def write_repository(src: str | Path, out: str | Path, options: TritonOptions, force: bool = False, tp: int = 1) -> dict[str, Any]:
    from sqdeploy.engines.triton.llmapi_repo import write_llmapi_repo
    from sqdeploy.engines.triton.onnx_repo import write_onnx_repo
    from sqdeploy.engines.triton.trtllm_repo import write_trtllm_repo

    src, out = Path(src), Path(out)
    kind = detect_source(src)
    with atomic_output_dir(out, force, inputs=[src, options.tokenizer]) as tmp:
        if kind == "trtllm-engine":
            result = write_trtllm_repo(src, tmp, options, out)
        elif kind == "onnx":
            result = write_onnx_repo(src, tmp, options, out)
        else:
            result = write_llmapi_repo(src, tmp, options, out, tp)
        findings = check_repository(tmp)
        failed = [f for f in findings if not f.ok]
        # an engine path meant for inside a container cannot be checked here
        if failed and not all(f.check == "engine directory" and options.engine_path for f in failed):
            raise SqDeployError(f"the written repository fails its own check:\n{report(failed)}")
    result["check"] = report(findings)
    return result
