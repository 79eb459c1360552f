"""Qwen2: the Llama layout plus bias on q/k/v (not on o_proj)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from sqdeploy.core.families.base import Family, ModelConfig
from sqdeploy.core.families.llama import HF_NAMES, SMOOTHING_GROUPS, TRTLLM_LAYOUT, llama_like_config


def _config(cfg: Mapping[str, Any]) -> ModelConfig:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return llama_like_config(cfg, "qwen2", qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=window)


QWEN2 = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    config_from_hf=_config,
    hf_names=HF_NAMES,
    smoothing_groups=SMOOTHING_GROUPS,
    trtllm=replace(
        TRTLLM_LAYOUT,
        architecture="Qwen2ForCausalLM",
        decoder="qwen",
        # QWenForCausalLM builds the Qwen2 layout only when qwen_type says so
        config={**TRTLLM_LAYOUT.config, "qwen_type": "qwen2"},
    ),
)
