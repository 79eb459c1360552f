"""N-bit weight-only linears: block-wise QDQ (standard ONNX) and ONNX Runtime's MatMulNBits.

Both forms carry the integers of the QuantizedModel unchanged, so they dequantize to
exactly the reference's weights (``qmath.dequantize_weight``):

* ``qdq``: the weight is stored transposed, [in, out], as int4 (symmetric, values
  -8..7) or uint4 with uint4 zero points (asymmetric, 0..15), two values per byte,
  the first in the low nibble (the ONNX packing); DequantizeLinear (opset 21) takes
  scales [in/group, out] with ``axis=0, block_size=group``. INT8 weights keep a
  per-output-channel (``axis=1``) or per-tensor DequantizeLinear.
* ``matmulnbits``: ``com.microsoft.MatMulNBits`` wants B as uint8 [N, k_blocks,
  block*bits/8] holding *unsigned* codes packed low nibble first along K, scales
  [N, k_blocks] in the activation type, and zero points packed the same way along
  the blocks, [N, ceil(k_blocks*bits/8)]. A symmetric code is ``q + 2^(bits-1)``
  with the op's default zero point ``2^(bits-1)``, so (code - zp) * s == q * s.
  Per-channel and per-tensor scales are repeated over the blocks of a row.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from sqdeploy.core.qmath import QWeight
from sqdeploy.core.schemes import WeightScheme
from sqdeploy.formats.onnx.builder import GraphBuilder, to_numpy

MS = "com.microsoft"


def pack_nibbles(values: np.ndarray) -> bytes:
    """Pack 4-bit values (any int dtype, flattened row-major) two per byte, first in the low nibble."""
    v = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return (v[0::2] | (v[1::2] << 4)).tobytes()


def row_scales(qw: QWeight, scheme: WeightScheme) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points) as [out, groups], per-tensor scales repeated per row."""
    out_f = qw.q.shape[0]
    scale = to_numpy(qw.scale).astype(np.float32).reshape(-1, to_numpy(qw.scale).shape[-1])
    if scale.shape[0] != out_f:
        scale = np.broadcast_to(scale, (out_f, scale.shape[1])).copy()
    zero = None if qw.zero is None else to_numpy(qw.zero).astype(np.int16).reshape(out_f, -1)
    return scale, zero


def qdq_weight(b: GraphBuilder, name: str, qw: QWeight, scheme: WeightScheme, npt) -> str:
    """DequantizeLinear of the transposed integer weight; returns the float [in, out] weight."""
    q = to_numpy(qw.q).astype(np.int8).T.copy()  # [in, out]
    scale, zero = row_scales(qw, scheme)
    in_f, out_f = q.shape
    groups = scale.shape[1]
    if scheme.bits == 8:
        s = scale[:, 0] if scheme.granularity != "tensor" else scale[:1, 0].reshape(())
        wq = b.initializer(f"{name}.qweight", q)
        sc = b.initializer(f"{name}.scale", s.astype(npt))
        zp = b.initializer(f"{name}.zero_point", np.zeros(s.shape, np.int8))
        return b.op("DequantizeLinear", [wq, sc, zp], f"{name}.weight", axis=1 if s.ndim else None)
    signed = zero is None
    dtype = TensorProto.INT4 if signed else TensorProto.UINT4
    per_channel = groups == 1
    s, z = scale.T.copy(), None if signed else zero.T.copy()  # [groups, out]
    if per_channel:
        s, z = s.reshape(out_f), None if z is None else z.reshape(out_f)
    inputs = [b.raw_initializer(f"{name}.qweight", dtype, [in_f, out_f], pack_nibbles(q)),
              b.initializer(f"{name}.scale", s.astype(npt))]
    if z is not None:
        inputs.append(b.raw_initializer(f"{name}.zero_point", dtype, z.shape, pack_nibbles(z)))
    attrs = dict(axis=1) if per_channel else dict(axis=0, block_size=in_f // groups)
    return b.op("DequantizeLinear", inputs, f"{name}.weight", **attrs)


def nbits_block(scheme: WeightScheme, in_features: int) -> int:
    """MatMulNBits block size: the group, or for per-channel/tensor scales the largest power of 2 dividing K."""
    if scheme.granularity == "group":
        return scheme.group_size
    for blk in (128, 64, 32, 16):
        if in_features % blk == 0:
            return blk
    return 128  # K is padded with zero-point codes


def matmulnbits_tensors(qw: QWeight, scheme: WeightScheme, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, k_blocks, blob], scales [N, k_blocks] float32, zero points packed uint8 or None)."""
    bits = scheme.bits
    q = to_numpy(qw.q).astype(np.int16)
    n, k = q.shape
    scale, zero = row_scales(qw, scheme)
    k_blocks = -(-k // block)
    reps = k_blocks // scale.shape[1] if scale.shape[1] < k_blocks else 1
    scale = np.repeat(scale, reps, axis=1)[:, :k_blocks]
    mid = 1 << (bits - 1)
    codes = q + mid if zero is None else q
    pad_code = mid if zero is None else 0
    if k_blocks * block != k:
        codes = np.pad(codes, ((0, 0), (0, k_blocks * block - k)), constant_values=pad_code)
    codes = codes.astype(np.uint8)
    if bits == 4:
        packed = np.frombuffer(pack_nibbles(codes), np.uint8).reshape(n, k_blocks, block // 2)
    else:
        packed = codes.reshape(n, k_blocks, block)
    zp = None
    if zero is not None:
        zero = np.repeat(zero, reps, axis=1)[:, :k_blocks]
        if bits == 4:
            zero = np.pad(zero, ((0, 0), (0, k_blocks % 2)))
            zp = np.frombuffer(pack_nibbles(zero), np.uint8).reshape(n, -1)
        else:
            zp = zero.astype(np.uint8)
    return packed, scale, zp


def matmulnbits(b: GraphBuilder, x: str, name: str, qw: QWeight, scheme: WeightScheme, npt,
                bias: np.ndarray | None, accuracy_level: int, out: str | None = None) -> str:
    """x [.., K] @ dequant(W)^T (+ bias) with one MatMulNBits node (output named ``out`` when given)."""
    n, k = qw.q.shape
    block = nbits_block(scheme, k)
    packed, scale, zp = matmulnbits_tensors(qw, scheme, block)
    inputs = [x, b.initializer(f"{name}.qweight", packed), b.initializer(f"{name}.scales", scale.astype(npt))]
    inputs.append("" if zp is None else b.initializer(f"{name}.zero_points", zp))
    if bias is not None:
        inputs += ["", b.initializer(f"{name}.bias", bias.astype(npt))]
    return b.op("MatMulNBits", inputs, name, outputs=[out] if out else 1, domain=MS, K=k, N=n, bits=scheme.bits,
                block_size=block, accuracy_level=accuracy_level)
