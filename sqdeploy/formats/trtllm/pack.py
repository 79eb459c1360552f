"""INT4 packing of W4A16_AWQ checkpoints: two output rows per byte, even row in the low nibble.

This is ModelOpt's ``pack_int4_in_uint8`` layout, stored as int8 (trtllm-build only
preprocesses int8 ``weight`` tensors; a uint8 one would be skipped and then fail the
shape check). The checkpoint stays architecture-neutral: trtllm-build transposes and
interleaves it for the GPU it builds for.
"""

from __future__ import annotations

import torch

from sqdeploy.core.errors import SqDeployError


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], shape [out, in] -> int8 [out / 2, in]."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise SqDeployError(f"INT4 packing needs an int8 matrix, got {q.dtype} {tuple(q.shape)}")
    if q.shape[0] % 2:
        raise SqDeployError(f"INT4 packing needs an even number of output rows, got {q.shape[0]}")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise SqDeployError("INT4 packing: values outside [-8, 7]")
    lo = q[0::2].to(torch.int16) & 0xF
    hi = q[1::2].to(torch.int16) & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8).contiguous()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_rows`: int8 [out / 2, in] -> int8 values in [-8, 7], [out, in]."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0xF, b >> 4
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.stack([lo, hi], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return out.to(torch.int8)
