"""Weight layouts the GPU kernels read.

INT4 weights are stored ``[in/8, out]`` int32, eight unsigned nibbles per word along
the input dimension, lowest nibble first (the GPTQ ``qweight`` orientation). One
layout serves every kernel: the decode GEMV and the tensor-core GEMM both walk K
in steps of whole words and read consecutive output channels, so loads coalesce,
and a packed tile of ``BLOCK_K/8`` rows unpacks in registers to ``BLOCK_K`` rows.
Symmetric weights are stored as ``q + 8`` with the constant zero point 8; asymmetric
ones keep qmath's unsigned ``q`` and an explicit zero point per group
(``[in/group, out]``: float16 on the GPU, where it is exact and the form gemlite's kernels
read as well (:mod:`.gemlite_int4`), uint8 elsewhere). Scales are ``[in/group, out]``.

INT8 weights stay ``[out, in]`` (K contiguous), the K-major operand layout that the
INT8 tensor-core instructions want; their per-output-channel scale is float32 ``[out]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.kernels.spec import LinearSpec

NIBBLES = 8  # INT4 values per int32 word
FP16_MIN_NORMAL = 2.0**-14
ZERO_GROUP_SCALE = 1e-7  # qmath.EPS-sized scales belong to all-zero groups (q == zero there)


def pack_int4(q_u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values ``[out, in]`` (0..15) -> int32 ``[in/8, out]``."""
    out_f, in_f = q_u.shape
    if in_f % NIBBLES:
        raise SqDeployError(f"INT4 packing needs in_features divisible by {NIBBLES}, got {in_f}")
    if int(q_u.min()) < 0 or int(q_u.max()) > 15:
        raise SqDeployError("INT4 packing expects unsigned values in [0, 15]")
    v = q_u.to(torch.int64).t().reshape(in_f // NIBBLES, NIBBLES, out_f)
    shifts = (torch.arange(NIBBLES, device=q_u.device, dtype=torch.int64) * 4).view(1, NIBBLES, 1)
    words = (v << shifts).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement view of the top nibble
    return words.to(torch.int32).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[in/8, out]`` -> unsigned 4-bit values ``[out, in]`` as int8."""
    kp, out_f = packed.shape
    shifts = (torch.arange(NIBBLES, device=packed.device, dtype=torch.int32) * 4).view(1, NIBBLES, 1)
    v = (packed.view(kp, 1, out_f) >> shifts) & 0xF
    return v.reshape(kp * NIBBLES, out_f).t().to(torch.int8).contiguous()


@dataclass(eq=False)
class Int4Weight:
    packed: torch.Tensor  # int32 [in/8, out]
    scales: torch.Tensor  # [in/group, out], float16 where exact enough, else float32
    zeros: torch.Tensor | None  # [in/group, out] (float16 on the GPU, else uint8); None: symmetric (zero point 8)
    group_size: int
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)

    def to(self, device: torch.device | str) -> "Int4Weight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Int4Weight(mv(self.packed), mv(self.scales), mv(self.zeros), self.group_size, self.out_features, self.in_features)


def scale_dtype(scales: torch.Tensor, compact: bool) -> torch.dtype:
    """float16 halves the scale bytes; keep float32 where float16 would round a scale badly."""
    if not compact:
        return torch.float32
    live = scales[scales > ZERO_GROUP_SCALE]
    if live.numel() and (float(live.min()) < FP16_MIN_NORMAL or float(live.max()) > 65504.0):
        return torch.float32
    return torch.float16


def int4_from_spec(spec: LinearSpec, compact_scales: bool) -> Int4Weight:
    """GPU layout of a 4-bit spec. ``compact_scales`` stores float16 scales (GPU); CPU keeps float32."""
    ws = spec.scheme.weight
    g = spec.group_size()
    if spec.in_features % g or g % NIBBLES:
        raise SqDeployError(f"INT4 group size {g} must divide in_features {spec.in_features} and be a multiple of 8")
    if ws.symmetric:
        q_u, zeros = (spec.q.to(torch.int16) + 8).to(torch.int8), None
    else:
        q_u, zeros = spec.q, spec.zero.t().contiguous().to(torch.float16 if compact_scales else torch.uint8)
    scales = spec.channel_scale().t().contiguous()
    scales = scales.to(scale_dtype(scales, compact_scales))
    return Int4Weight(pack_int4(q_u), scales, zeros, g, spec.out_features, spec.in_features)


def dequantize_int4(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` in float32 as qmath computes it, then ``dtype``: the reference weight ``[out, in]``."""
    q = unpack_int4(w.packed).float()  # [out, in]
    zero = 8.0 if w.zeros is None else w.zeros.t().float().repeat_interleave(w.group_size, dim=1)
    scale = w.scales.t().float().repeat_interleave(w.group_size, dim=1)
    return ((q - zero) * scale).to(dtype)


@dataclass(eq=False)
class Int8Weight:
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4


def int8_from_spec(spec: LinearSpec) -> Int8Weight:
    if spec.scheme.weight.granularity == "group":
        raise SqDeployError("group-wise INT8 weights are not supported by the INT8 GEMM; use per-channel or per-tensor")
    return Int8Weight(spec.q.contiguous(), spec.channel_scale().reshape(-1).contiguous())
