"""What a TensorRT-LLM export is asked to be: ``TrtllmOptions`` for the engine-flow checkpoint
(``--target trtllm``), ``TrtllmHfOptions`` for ModelOpt's unified HF checkpoint (``--target trtllm-hf``)."""

from __future__ import annotations

from dataclasses import dataclass

from sqdeploy.core.errors import SqDeployError

KV_CACHES = ("int8",)
REQUANT_CLIPS = ("search", "none")


@dataclass(frozen=True)
class TrtllmOptions:
    """``export(..., TrtllmOptions(...), out)``: the checkpoint's sharding and quantization choices."""

    tp: int = 1  # tensor-parallel size: one rank{r}.safetensors per rank
    pp: int = 1  # pipeline-parallel size (only 1)
    kv_cache: str | None = None  # "int8": INT8 KV cache from the calibrated K/V ranges
    int4_zero_point: bool = False  # experimental: keep an asymmetric INT4 recipe's zero points
    int4_requant_clip: str = "search"  # symmetric INT4 re-quantization: search each group's clipping range, or "none"
    eval_text: str | None = None  # after writing, score the checkpoint and the quantized model on this text
    eval_windows: int = 24  # windows of 512 tokens for eval_text

    def __post_init__(self):
        if self.kv_cache not in (None, *KV_CACHES):
            raise SqDeployError(f"kv_cache {self.kv_cache!r}: choose {', '.join(KV_CACHES)} or None")
        if self.int4_requant_clip not in REQUANT_CLIPS:
            raise SqDeployError(f"int4_requant_clip {self.int4_requant_clip!r}: choose {' or '.join(REQUANT_CLIPS)}")


@dataclass(frozen=True)
class TrtllmHfOptions:
    """``export(..., TrtllmHfOptions(), out)``: nothing to choose. The unified checkpoint is one rank
    (set tensor_parallel_size when serving it), with no KV-cache quantization, float or W4A16_AWQ as
    the recipe says."""
