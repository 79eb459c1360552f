"""``sq-build --plan``: a memory plan from an HF model (plus a recipe) or a TensorRT-LLM checkpoint."""

from __future__ import annotations

from pathlib import Path

from sqdeploy.core.errors import SqDeployError
from sqdeploy.engines.gpus import GpuProfile
from sqdeploy.engines.model_shape import (
    WeightFormat,
    config_from_hf,
    config_from_trtllm,
    is_trtllm_config,
    quantization_for_scheme,
    read_config,
)
from sqdeploy.engines.planner import Deployment, MemoryPlan, min_gpus, plan_memory


def plan_from_args(source: str | Path, gpu: GpuProfile, recipe: str = "fp16", tp: str | int | None = None,
                   kv_cache: str = "fp16", dtype: str | None = None, max_batch_size: int = 64,
                   max_seq_len: int | None = None, max_num_tokens: int = 8192, kv_cache_fraction: float = 0.9) -> MemoryPlan:
    cfg, path = read_config(source)
    name = Path(source).name if Path(source).is_dir() else path.stem
    if is_trtllm_config(cfg):
        shape = config_from_trtllm(cfg)
        fmt = WeightFormat.from_trtllm(cfg.get("quantization"), shape.dtype)
        default_tp = int((cfg.get("mapping") or {}).get("tp_size", 1))
        parallel_embedding = bool(cfg.get("use_parallel_embedding", False))
    else:
        from sqdeploy.quantize.recipes import load_recipe

        shape = config_from_hf(cfg, dtype=dtype)
        quant = quantization_for_scheme(load_recipe(recipe).scheme, "INT8" if kv_cache == "int8" else None)
        fmt = WeightFormat.from_trtllm(quant, shape.dtype)
        name = f"{name} {recipe}"
        default_tp, parallel_embedding = 1, True
    dep = Deployment(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                     kv_cache_fraction=kv_cache_fraction, parallel_embedding=parallel_embedding)
    if tp == "auto":
        best = min_gpus(shape, fmt, gpu, dep, name)
        if best is None:
            plan = plan_memory(shape, fmt, gpu, Deployment(**{**dep.__dict__, "tp": 16}), name)
            raise SqDeployError(f"{name} does not fit even 16 x {gpu.name}: {plan.why_not()}; use a lower-bit recipe or a larger GPU")
        return best
    n = int(tp) if tp is not None else default_tp
    if n < 1:
        raise SqDeployError(f"--tp must be at least 1 (or 'auto'), got {tp}")
    return plan_memory(shape, fmt, gpu, Deployment(**{**dep.__dict__, "tp": n}), name)
