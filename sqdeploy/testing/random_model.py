"""Random-initialised models of every supported family, saved as real HF checkpoints.

Used for coverage tests (tiny configs) and for speed and memory benchmarks (e.g. a
1B-parameter Llama), where the values do not matter but the shapes and the files do.
``python -m sqdeploy.testing.random_model llama OUT --hidden-size 2048 ...`` writes one.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch

# Heads divide 8 so tensor-parallel sharding up to tp 8 can be tested; Llama keeps GQA.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
        max_position_embeddings=256, sliding_window=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "opt": dict(
        architectures=["OPTForCausalLM"], model_type="opt", hidden_size=128, ffn_dim=256,
        num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=256,
        do_layer_norm_before=True, word_embed_proj_dim=128, tie_word_embeddings=True,
    ),
}

LLAMA_1B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def make_random_model(
    family_or_config: str | dict[str, Any],
    out: str | Path,
    vocab_size: int = 8192,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    init_std: float = 0.02,
    **overrides: Any,
) -> Path:
    """Write a random model directory (config.json + safetensors [+ tokenizer files])."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[family_or_config] if isinstance(family_or_config, str) else family_or_config)
    spec.update(vocab_size=vocab_size, **overrides)
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **spec)
    if model_type == "opt":
        cfg.init_std = init_std
    else:
        cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb_norms(model, seed)
    model = model.to(dtype)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_from) / name
            if src.exists():
                shutil.copy(src, out / name)
    return out


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norm weights at 1 and biases at 0, which would hide a wrong fold."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                if name.endswith("weight"):
                    p.copy_(1 + 0.5 * (torch.rand(p.shape, generator=g) - 0.5))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=[*TINY_CONFIGS, "llama-1b"])
    ap.add_argument("out")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--tokenizer-from", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    spec: str | dict = LLAMA_1B if args.family == "llama-1b" else args.family
    path = make_random_model(
        spec, args.out, vocab_size=args.vocab_size, dtype=getattr(torch, args.dtype),
        seed=args.seed, tokenizer_from=args.tokenizer_from,
    )
    print(path)


if __name__ == "__main__":
    main()
