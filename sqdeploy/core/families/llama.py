"""Llama and Mistral: RMSNorm, RoPE, gated SiLU MLP, optional GQA.

Qwen2 shares this layout (``qwen2.py`` reuses the tables) and only adds q/k/v bias.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import Family, ModelConfig, SmoothGroup, TrtllmLayout, TrtllmModule

HF_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{
        f"layers.{{i}}.{c}.{p}": f"model.layers.{{i}}.self_attn.{c}_proj.{p}"
        for c in ("q", "k", "v", "o")
        for p in ("weight", "bias")
    },
    **{
        f"layers.{{i}}.{c}.{p}": f"model.layers.{{i}}.mlp.{c}_proj.{p}"
        for c in ("gate", "up", "down")
        for p in ("weight", "bias")
    },
}

SMOOTHING_GROUPS = (
    SmoothGroup("attn_norm", ("q", "k", "v"), "norm"),
    SmoothGroup("mlp_norm", ("gate", "up"), "norm"),
    SmoothGroup("up", ("down",), "linear"),
    SmoothGroup("v", ("o",), "gqa"),
)

# TensorRT-LLM checkpoint layout (read by sqdeploy/formats/trtllm). q/k/v rows are split by
# heads (K/V heads duplicated when tp > KV heads). Note the inverted MLP naming:
# TensorRT-LLM's GatedMLP computes proj(act(fc(x)) * gate(x)), so "fc" holds HF gate_proj
# and "gate" holds up_proj.
TRTLLM_LINEARS = {
    "attention.qkv": TrtllmModule(("q", "k", "v"), "column"),
    "attention.dense": TrtllmModule(("o",), "row"),
    "mlp.fc": TrtllmModule(("gate",), "column"),
    "mlp.gate": TrtllmModule(("up",), "column"),
    "mlp.proj": TrtllmModule(("down",), "row"),
}
TRTLLM_CONFIG_FIELDS = {
    "num_hidden_layers": ("num_layers", "num_hidden_layers"),
    "num_attention_heads": ("num_heads", "num_attention_heads"),
    "num_key_value_heads": ("num_kv_heads", "num_key_value_heads"),
    "hidden_size": ("hidden_size", "hidden_size"),
    "intermediate_size": ("intermediate_size", "intermediate_size"),
    "head_size": ("head_dim", "head_dim"),
    "norm_epsilon": ("norm_eps", "rms_norm_eps"),
    "vocab_size": ("vocab_size", "vocab_size"),
    "max_position_embeddings": ("max_positions", "max_position_embeddings"),
    "hidden_act": ("act", "hidden_act"),
    "rotary_base": ("rope_theta", "rope_theta"),
    "rotary_scaling": ("rope_scaling", "rope_scaling"),
    "attn_bias": ("qkv_bias", "attention_bias"),
    "mlp_bias": ("mlp_bias", "mlp_bias"),
    "tie_word_embeddings": ("tie_embeddings", "tie_word_embeddings"),
}
TRTLLM_LAYOUT = TrtllmLayout(
    architecture="LlamaForCausalLM",
    decoder="llama",
    linears=TRTLLM_LINEARS,
    norms={"input_layernorm": "attn_norm", "post_layernorm": "mlp_norm"},
    globals={
        "transformer.vocab_embedding.weight": ("embed.weight", "embedding"),
        "transformer.ln_f.weight": ("final_norm.weight", "replicated"),
        "lm_head.weight": ("lm_head.weight", "vocab"),
    },
    config_fields=TRTLLM_CONFIG_FIELDS,
    config={"position_embedding_type": "rope_gpt_neox", "rotary_pct": 1.0},
    # ModelOpt's unified HF checkpoint (TensorRT-LLM's PyTorch backend): q/k/v and gate/up are
    # fused there and take their pre_quant_scale from the norm
    hf_unified_pre_quant_scale=("o", "down"),
)


def rope_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise transformers 4.x (``rope_theta``/``rope_scaling``) and 5.x (``rope_parameters``)."""
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
    rope_type = params.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise SqDeployError(
            f"rope type '{rope_type}' changes with sequence length and is not supported; "
            "supported rope types: default, linear, llama3, yarn"
        )
    scaling = None if rope_type == "default" else params
    return {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_scaling": scaling}


def llama_like_config(cfg: Mapping[str, Any], family: str, **overrides: Any) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    fields: dict[str, Any] = dict(
        family=family,
        architecture=(cfg.get("architectures") or ["?"])[0],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        max_positions=cfg.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        act=cfg.get("hidden_act", "silu"),
        gated_mlp=True,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window"),
        dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        hf_config=dict(cfg),
        **rope_fields(cfg),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


LLAMA = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    config_from_hf=lambda cfg: llama_like_config(cfg, "llama", sliding_window=None),
    hf_names=HF_NAMES,
    smoothing_groups=SMOOTHING_GROUPS,
    trtllm=TRTLLM_LAYOUT,
)

MISTRAL = Family(
    name="mistral",
    architectures=("MistralForCausalLM",),
    config_from_hf=lambda cfg: llama_like_config(cfg, "mistral"),
    hf_names=HF_NAMES,
    smoothing_groups=SMOOTHING_GROUPS,
    trtllm=replace(
        TRTLLM_LAYOUT,
        architecture="MistralForCausalLM",
        # not read by TensorRT-LLM (the window is the runtime's max_attention_window_size);
        # kept so the checkpoint still says what the model needs
        config_fields={**TRTLLM_CONFIG_FIELDS, "sliding_window": ("sliding_window", "sliding_window")},
    ),
)
