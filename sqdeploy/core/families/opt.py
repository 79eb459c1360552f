"""OPT: pre-LayerNorm with bias, learned positions (offset 2), ReLU fc1/fc2 MLP.

fc1 and fc2 take the canonical names ``up`` and ``down``; ReLU is positively
homogeneous, so fc1 -> fc2 is a valid smoothing pair just like Llama's up -> down.
"""

from __future__ import annotations

from typing import Any, Mapping

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import Family, ModelConfig, SmoothGroup, TrtllmLayout, TrtllmModule

_L = "model.decoder.layers.{i}."
HF_NAMES = {
    "embed.weight": "model.decoder.embed_tokens.weight",
    "pos_embed.weight": "model.decoder.embed_positions.weight",
    "final_norm.weight": "model.decoder.final_layer_norm.weight",
    "final_norm.bias": "model.decoder.final_layer_norm.bias",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": _L + "self_attn_layer_norm.weight",
    "layers.{i}.attn_norm.bias": _L + "self_attn_layer_norm.bias",
    "layers.{i}.mlp_norm.weight": _L + "final_layer_norm.weight",
    "layers.{i}.mlp_norm.bias": _L + "final_layer_norm.bias",
    **{f"layers.{{i}}.{c}.{p}": f"{_L}self_attn.{c}_proj.{p}" for c in ("q", "k", "v") for p in ("weight", "bias")},
    **{f"layers.{{i}}.o.{p}": f"{_L}self_attn.out_proj.{p}" for p in ("weight", "bias")},
    **{f"layers.{{i}}.up.{p}": f"{_L}fc1.{p}" for p in ("weight", "bias")},
    **{f"layers.{{i}}.down.{p}": f"{_L}fc2.{p}" for p in ("weight", "bias")},
}


def _config(cfg: Mapping[str, Any]) -> ModelConfig:
    if not cfg.get("do_layer_norm_before", True):
        raise SqDeployError(
            "OPT with do_layer_norm_before=false (post-norm, e.g. opt-350m) cannot carry folded smoothing; "
            "use a pre-norm OPT (125m, 1.3b and larger)"
        )
    hidden = cfg["hidden_size"]
    if cfg.get("word_embed_proj_dim", hidden) != hidden:
        raise SqDeployError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if cfg.get("_remove_final_layer_norm", False):
        raise SqDeployError("OPT without a final layer norm (_remove_final_layer_norm) is not supported")
    heads = cfg["num_attention_heads"]
    act = cfg.get("activation_function", "relu")
    if act != "relu":
        raise SqDeployError(f"OPT with activation '{act}' is not supported: fc1->fc2 smoothing needs ReLU")
    return ModelConfig(
        family="opt",
        architecture=(cfg.get("architectures") or ["OPTForCausalLM"])[0],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["ffn_dim"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_positions=cfg.get("max_position_embeddings", 2048),
        norm="layernorm",
        norm_eps=1e-5,
        act="relu",
        gated_mlp=False,
        qkv_bias=bool(cfg.get("enable_bias", True)),
        o_bias=bool(cfg.get("enable_bias", True)),
        mlp_bias=bool(cfg.get("enable_bias", True)),
        position="learned",
        pos_offset=2,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        hf_config=dict(cfg),
    )


OPT = Family(
    name="opt",
    architectures=("OPTForCausalLM",),
    config_from_hf=_config,
    hf_names=HF_NAMES,
    smoothing_groups=(
        SmoothGroup("attn_norm", ("q", "k", "v"), "norm"),
        SmoothGroup("mlp_norm", ("up",), "norm"),
        SmoothGroup("up", ("down",), "linear"),
        SmoothGroup("v", ("o",), "gqa"),
    ),
    # TensorRT-LLM layout, after its OPT converter (examples/models/contrib/opt/convert_checkpoint.py);
    # field meanings as in llama.py
    trtllm=TrtllmLayout(
        architecture="OPTForCausalLM",
        decoder="opt",
        linears={
            "attention.qkv": TrtllmModule(("q", "k", "v"), "column"),
            "attention.dense": TrtllmModule(("o",), "row"),
            "mlp.fc": TrtllmModule(("up",), "column"),
            "mlp.proj": TrtllmModule(("down",), "row"),
        },
        norms={"input_layernorm": "attn_norm", "post_layernorm": "mlp_norm"},
        globals={
            "transformer.vocab_embedding.weight": ("embed.weight", "embedding"),
            # HF keeps 2 unused rows before position 0 (pos_offset); TensorRT-LLM does not
            "transformer.position_embedding.weight": ("pos_embed.weight", "embedding"),
            "transformer.ln_f.weight": ("final_norm.weight", "replicated"),
            "transformer.ln_f.bias": ("final_norm.bias", "replicated"),
            "lm_head.weight": ("lm_head.weight", "vocab"),
        },
        config_fields={
            "num_hidden_layers": ("num_layers", "num_hidden_layers"),
            "num_attention_heads": ("num_heads", "num_attention_heads"),
            "hidden_size": ("hidden_size", "hidden_size"),
            # OPTDecoderLayer falls back to 4 * hidden_size without it
            "intermediate_size": ("intermediate_size", "ffn_dim"),
            "vocab_size": ("vocab_size", "vocab_size"),
            "max_position_embeddings": ("max_positions", "max_position_embeddings"),
            "hidden_act": ("act", "activation_function"),
            "tie_word_embeddings": ("tie_embeddings", "tie_word_embeddings"),
        },
        # OPTForCausalLM.check_config defaults do_layer_norm_before to False (post-norm)
        config={"position_embedding_type": "learned_absolute", "do_layer_norm_before": True},
    ),
)
