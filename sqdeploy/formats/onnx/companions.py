"""The files other ONNX tools read beside ``model.onnx``, generated from ``sqdeploy-onnx.json``.

* ``config.json``: the source model's Hugging Face config (without the compressed-tensors
  ``quantization_config``, which describes the quantized directory, not the graph). Optimum's
  ``ORTModelForCausalLM.from_pretrained(DIR)`` infers the library and the model type from it.
* ``generation_config.json``: copied from the source when it has one, else written from the
  config's bos/eos/pad ids, so ``generate`` stops where the model's own generation does.
* ``genai_config.json``: ONNX Runtime GenAI's description (``og.Model(DIR)``), keys as its
  configuration reference documents them: the graph's input/output names with ``%d`` layer
  templates, heads, head size, context length, token ids, and greedy search defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqdeploy.formats.onnx.contract import COMPANIONS, GENAI_CONFIG, GENERATION_CONFIG, GRAPH, HF_CONFIG

__all__ = ["COMPANIONS", "GENAI_CONFIG", "GENERATION_CONFIG", "HF_CONFIG", "write_companions"]

# GenAI model types whose decoder-only pipeline matches ours by name; others use its generic "decoder"
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
GENAI_GENERIC_TYPE = "decoder"


def hf_config(source: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The source config as the graph's: no quantization_config, the graph's dtype."""
    cfg = {k: v for k, v in source.items() if k not in ("quantization_config", "torch_dtype")}
    cfg["dtype"] = meta["dtype"]
    cfg["use_cache"] = True
    return cfg


def _layer_template(names: list[str], prefix: str, kind: str) -> str:
    """``past_key_values.%d.key`` from the per-layer names the meta lists (checked, not assumed)."""
    template = f"{prefix}.%d.{kind}"
    layered = [n for n in names if n.startswith(prefix + ".") and n.endswith("." + kind)]
    expected = [template % i for i in range(len(layered))]
    if layered != expected:
        raise ValueError(f"layer names {layered[:2]}... do not follow {template}")
    return template


def genai_config(meta: dict[str, Any], shared_buffer: bool) -> dict[str, Any]:
    """``genai_config.json`` for the graph ``meta`` describes (ONNX Runtime GenAI's schema).

    ``shared_buffer``: whether past and present may be one fixed-capacity buffer
    (GroupQueryAttention graphs); graphs that concatenate the cache need separate ones.
    """
    ins, outs = meta["inputs"], meta["outputs"]
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in ins:
        inputs["position_ids"] = "position_ids"
    inputs["past_key_names"] = _layer_template(ins, "past_key_values", "key")
    inputs["past_value_names"] = _layer_template(ins, "past_key_values", "value")
    outputs = {"logits": "logits", "present_key_names": _layer_template(outs, "present", "key"),
               "present_value_names": _layer_template(outs, "present", "value")}
    eos = meta["eos_token_id"]
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = meta["pad_token_id"] if meta["pad_token_id"] is not None else first_eos
    context = int(meta["max_positions"])
    return {
        "model": {
            "bos_token_id": meta["bos_token_id"] if meta["bos_token_id"] is not None else first_eos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": meta.get("model_file", GRAPH),
                "head_size": int(meta["head_dim"]),
                "hidden_size": int(meta["hidden_size"]),
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": int(meta["num_heads"]),
                "num_hidden_layers": int(meta["num_layers"]),
                "num_key_value_heads": int(meta["num_kv_heads"]),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_TYPES.get(meta["family"], GENAI_GENERIC_TYPE),
            "vocab_size": int(meta["vocab_size"]),
        },
        "search": {  # greedy, as sq-serve's default and the parity checks
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": shared_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def shares_buffer(meta: dict[str, Any]) -> bool:
    """GroupQueryAttention (the onnxruntime variant) updates a fixed-capacity cache in place."""
    return meta.get("variant") == "onnxruntime"


def write_companions(out: Path, source_config: dict[str, Any], meta: dict[str, Any], source_dir: Path | None) -> None:
    """Write config.json, generation_config.json (when the source has none to copy) and genai_config.json."""
    from transformers import GenerationConfig

    out = Path(out)
    (out / HF_CONFIG).write_text(json.dumps(hf_config(source_config, meta), indent=2) + "\n")
    if not (out / GENERATION_CONFIG).exists():
        if source_dir is not None and (Path(source_dir) / GENERATION_CONFIG).exists():
            (out / GENERATION_CONFIG).write_bytes((Path(source_dir) / GENERATION_CONFIG).read_bytes())
        else:
            GenerationConfig(bos_token_id=meta["bos_token_id"], eos_token_id=meta["eos_token_id"],
                             pad_token_id=meta["pad_token_id"]).to_json_file(str(out / GENERATION_CONFIG))
    genai = genai_config(meta, shares_buffer(meta))
    (out / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
