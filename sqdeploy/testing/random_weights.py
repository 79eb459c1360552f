"""Kernel models with random weights in the shapes of real ones, built on the GPU directly.

Speed does not depend on the weight values, so the GPU benchmark needs no 13 GB
download: integer weights, scales and zero points are drawn on the device in each
variant's own format (values spread like a trained model's, so activations stay finite).
"""

from __future__ import annotations

import torch

from sqdeploy.core.families import family_for_hf_config
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.core.schemes import ActScheme, QuantScheme, WeightScheme
from sqdeploy.kernels.linears import KernelLinear, build_linear
from sqdeploy.kernels.model import KernelTransformer
from sqdeploy.kernels.spec import LinearSpec
from sqdeploy.kernels.swap import build_block, shell
from sqdeploy.model.layers import Norm

LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16",
)
CODELLAMA_34B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=22016,
    num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
    max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False, dtype="float16",
)

VARIANTS: dict[str, QuantScheme] = {
    "fp16": QuantScheme(None),
    "w8a8": QuantScheme(WeightScheme(8, "channel"), ActScheme("static_tensor")),
    "w8a8-token": QuantScheme(WeightScheme(8, "channel"), ActScheme("dynamic_token")),
    "w4a16": QuantScheme(WeightScheme(4, "group", 128, symmetric=False)),
}
WEIGHT_STD = 0.02


def config_of(hf: dict) -> ModelConfig:
    return family_for_hf_config(hf).config_from_hf(hf)


def random_spec(out_f: int, in_f: int, scheme: QuantScheme, device, gen: torch.Generator) -> LinearSpec:
    def jitter(*shape):
        return 0.75 + 0.5 * torch.rand(*shape, device=device, generator=gen)

    if scheme.is_float:
        w = torch.randn(out_f, in_f, device=device, generator=gen, dtype=torch.float16) * WEIGHT_STD
        return LinearSpec(out_f, in_f, scheme, weight=w)
    ws = scheme.weight
    if ws.bits == 8:
        q = torch.randint(-127, 128, (out_f, in_f), device=device, generator=gen, dtype=torch.int8)
        scale = jitter(out_f, 1) * (WEIGHT_STD / 73.0)  # uniform int8 has std ~73
        act = torch.tensor([5.0 / 127.0], device=device) if scheme.act.static else None
        return LinearSpec(out_f, in_f, scheme, q=q, scale=scale, act_scale=act)
    groups = in_f // ws.group_size
    q = torch.randint(0, 16, (out_f, in_f), device=device, generator=gen, dtype=torch.int8)
    scale = jitter(out_f, groups) * (WEIGHT_STD / 4.6)  # uniform int4 has std ~4.6
    zero = torch.randint(6, 10, (out_f, groups), device=device, generator=gen, dtype=torch.int8)
    if ws.symmetric:
        q, zero = q - 8, None
    return LinearSpec(out_f, in_f, scheme, q=q, scale=scale, zero=zero)


def random_linear(out_f: int, in_f: int, scheme: QuantScheme, device, seed: int = 0) -> KernelLinear:
    gen = torch.Generator(device=device).manual_seed(seed)
    return build_linear(random_spec(out_f, in_f, scheme, device, gen), device, torch.float16)


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of the GEMMs one decoder layer runs: q|k|v and gate|up fused, as the kernel model does."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size), "gate_up": (2 * i, h), "down": (h, i)}


@torch.no_grad()
def random_model(cfg: ModelConfig, scheme: QuantScheme, device, layers: int | None = None, seed: int = 0) -> KernelTransformer:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.float16
    emb = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
    emb.weight.normal_(0.0, 1.0, generator=gen)
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
    head.weight.normal_(0.0, WEIGHT_STD, generator=gen)
    model = shell(cfg, emb, None, Norm(cfg).to(device, dtype), head, device)
    for i in range(cfg.num_layers if layers is None else layers):
        specs = {n: random_spec(*cfg.linear_shape(n), scheme, device, gen) for n in cfg.linears}
        norms = (Norm(cfg).to(device, dtype), Norm(cfg).to(device, dtype))
        model.layers.append(build_block(cfg, i, specs, norms, device, dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights: the decoder's linears, and everything (embeddings, head, norms)."""
    linears = sum(m.weight_bytes() for m in model.modules() if isinstance(m, KernelLinear))
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    rotary = getattr(model, "rotary", None)
    if rotary is not None:
        total -= sum(t.numel() * t.element_size() for t in rotary.buffers())
    return {"linears": linears, "total": total}
