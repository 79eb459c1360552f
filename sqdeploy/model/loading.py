"""Materialise the reference model (or one decoder layer of it) from a tensor source.

A *tensor source* is anything with ``get(canonical_name, dtype)`` and ``has(name)``:
an :class:`~sqdeploy.model.checkpoint.HFCheckpoint`, a quantized model directory, a
TensorRT-LLM checkpoint reader. Sources that carry quantization also implement
``configure_block(block)`` to set the activation schemes and static scales.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from sqdeploy.core.families.base import ATTN_LINEARS, ModelConfig
from sqdeploy.model.checkpoint import layer_tensor_names
from sqdeploy.model.transformer import Block, Transformer


class TensorSource(Protocol):
    config: ModelConfig

    def get(self, canonical: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def has(self, canonical: str) -> bool: ...


def quantize_activations(
    block: Block, cfg: ModelConfig, scheme, input_scale: Callable[[int, str], torch.Tensor | None]
) -> None:
    """Give every linear of ``block`` the scheme's activation quantization and, for static
    schemes, its calibrated scale (``input_scale(layer, name)``): what a quantized source
    prescribes beyond its weights, so the reference model reproduces the deployed arithmetic."""
    if scheme.is_float:
        return
    for name in cfg.linears:
        lin = block.linear(name)
        lin.act = scheme.act
        s = input_scale(block.index, name) if scheme.act.static else None
        lin.input_scale = None if s is None else s.to(lin.weight.device)


def block_path(local: str) -> str:
    """Canonical layer-local name (``q.weight``) -> parameter path inside :class:`Block`."""
    head = local.split(".", 1)[0]
    if head in ATTN_LINEARS:
        return "attn." + local
    if head in ("gate", "up", "down"):
        return "mlp." + local
    return local


def load_block(src: TensorSource, i: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Block:
    cfg = src.config
    with torch.device("meta"):
        block = Block(cfg, i)
    prefix = f"layers.{i}."
    read = _reader(src, dtype, torch.device(device))
    state = {block_path(n[len(prefix):]): read(n) for n in layer_tensor_names(cfg, i)}
    block.load_state_dict(state, strict=True, assign=True)
    for p in block.parameters():
        p.requires_grad_(False)
    configure = getattr(src, "configure_block", None)
    if configure is not None:
        configure(block)
    return block.to(device)


def _reader(src: TensorSource, dtype: torch.dtype, device: torch.device) -> Callable[[str], torch.Tensor]:
    """How a layer's tensors reach ``device``: for an accelerator, as stored (float16 weights cross
    to the device at half the float32 bytes and are widened there, not on the host), when the source
    can give them so; the values are the same either way."""
    stored = getattr(src, "get_stored", None)
    if device.type == "cpu" or stored is None:
        return lambda name: src.get(name, dtype).to(device)
    return lambda name: stored(name).to(device).to(dtype)


def load_model(
    src: TensorSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_layers: bool = True,
    with_head: bool = True,
) -> Transformer:
    """The whole reference model; ``with_layers=False`` gives embeddings and head only (streaming);
    ``with_head=False`` leaves the output head unread (tied to the embedding), for embedding alone."""
    cfg = src.config
    with torch.device("meta"):
        model = Transformer(cfg, layers=0)
    read = _reader(src, dtype, torch.device(device))  # on an accelerator the host holds one stored tensor at a time
    glob = {"embed.weight": read("embed.weight"), "final_norm.weight": read("final_norm.weight")}
    if cfg.norm_has_bias:
        glob["final_norm.bias"] = read("final_norm.bias")
    if cfg.position == "learned":
        glob["pos_embed.weight"] = read("pos_embed.weight")
    tied = not with_head or not src.has("lm_head.weight")
    glob["lm_head.weight"] = glob["embed.weight"] if tied else read("lm_head.weight")
    # rotary buffers are not in the checkpoint: rebuild them off the meta device
    rotary = None
    if model.rotary is not None:
        from sqdeploy.model.layers import Rotary

        rotary = Rotary(cfg)
    model.load_state_dict(glob, strict=False, assign=True)
    if rotary is not None:
        model.rotary = rotary
    model.to(device)
    if with_layers:
        model.layers.extend(load_block(src, i, dtype, device) for i in range(cfg.num_layers))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
