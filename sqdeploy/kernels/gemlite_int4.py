"""gemlite's INT4 kernels as extra candidates of the W4A16 tuner, on the weights in place.

gemlite (a Triton kernel library, pure Python, ``pip install gemlite``) packs 4-bit
weights exactly as :mod:`.packing` does: eight nibbles per int32 along K, lowest nibble
first, stored ``[in/8, out]`` with the output channels contiguous, scales and zero
points ``[in/group, out]``, and ``(q - zero) * scale`` as the dequantization (its
``W_group_mode`` 3). So its GEMV and split-K GEMM kernels run on the packed weights a
:class:`~.packing.Int4Weight` already holds: no second copy, no repacking. Symmetric
weights (stored ``q + 8``) use its scalar zero point 8; asymmetric ones hand over their
float16 zero points (gemlite gives wrong results with uint8 ones).

Each gemlite kernel type is offered to the per-shape tuner next to this package's own
configurations and wins only where it is faster on the GPU at hand; the GPU self-check
compares every offered type against the reference first and disables a failing one.
Absent gemlite, or with ``SQDEPLOY_GEMLITE=0``, nothing changes.
"""

from __future__ import annotations

import ast
import functools
import math
import os

import torch

KIND = "gemlite"
# gemlite's kernel types per bucket of rows (a choice made for one M is reused for every M of its
# bucket, so only types valid for all of them). Left out after the GPU self-check on an H100 and an
# H200 (gemlite 0.6.0): GEMV_REVSPLITK and GEMV (wrong or run-to-run different results with these
# weights) and GEMM_SPLITK (results differ run to run: unordered atomic adds).
TYPES_BY_BUCKET = {1: ("GEMV_SPLITK",), 64: ("GEMM",), 256: ("GEMM",)}
TYPE_ID = 104  # gemlite's autotune key for float16 inputs and 4-bit weights
PACKED_PER_WORD = 8


@functools.lru_cache(maxsize=1)
def _module():
    if os.environ.get("SQDEPLOY_GEMLITE", "1") == "0" or not torch.cuda.is_available():
        return None
    try:
        import gemlite
        from gemlite import core
    except Exception:  # noqa: BLE001 - an optional dependency: absent or broken means not offered
        return None
    if not core.GEMLITE_TRITON_CONFIG_CACHE and torch.cuda.get_device_capability()[0] == 9:
        # gemlite ships tuned launch configurations for the H100 only; other Hopper GPUs start from them
        core.GemLiteLinear.load_config(os.path.join(os.path.dirname(core.__file__), "configs", "h100.json"))
    return gemlite, core


def available() -> bool:
    return _module() is not None


def candidates(bucket: int, group: int, asym: bool) -> list[dict]:
    """The gemlite kernel types to time for a bucket of rows (none when gemlite is unavailable)."""
    if not available() or group % 32:
        return []
    zero = "asym" if asym else "sym"
    return [{"KIND": KIND, "TYPE": t, "ZERO": zero} for t in TYPES_BY_BUCKET.get(bucket, ())]


@functools.lru_cache(maxsize=None)
def _seed_config(kind: str, m: int, n: int, k: int, group: int) -> None:
    """Give gemlite a launch configuration for this shape so it never autotunes at run time (which
    would take tens of seconds per shape and cannot happen inside a CUDA-graph capture): the one it
    ships for the nearest shape of the same kernel type, group size and row bucket."""
    from gemlite.triton_kernels.utils import get_closest_m

    _, core = _module()
    table = core.GEMLITE_TRITON_CONFIG_CACHE.setdefault(kind, {})
    mb = get_closest_m(m)
    key = str((mb, n, k, group, PACKED_PER_WORD, TYPE_ID))
    if key in table:
        return
    best, best_d = None, float("inf")
    for sig, cfg in table.items():
        try:
            m2, n2, k2, g2, e2, t2 = ast.literal_eval(sig)  # gemlite's keys: tuples of ints as strings
        except (ValueError, SyntaxError, TypeError):
            continue
        if (g2, e2, t2) != (group, PACKED_PER_WORD, TYPE_ID):
            continue
        d = abs(math.log(n2 / n)) + abs(math.log(k2 / k)) + 4 * abs(math.log(m2 / mb))
        if d < best_d:
            best, best_d = cfg, d
    if best is not None:
        table[key] = dict(best)


@functools.lru_cache(maxsize=None)
def _meta_args(group: int, asym: bool, scale_dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
    """gemlite's metadata for this weight format, taken from a small layer it packs itself."""
    gemlite, core = _module()
    k = 2 * max(group, 128)  # two groups at least: one group per row would read as per-channel scales
    layer = gemlite.GemLiteLinearTriton(4, group_size=group, in_features=k, out_features=64,
                                        input_dtype=gemlite.DType.FP16, output_dtype=gemlite.DType.FP16)
    q = torch.zeros(64, k, dtype=torch.uint8, device=device)
    s = torch.ones(64, k // group, dtype=scale_dtype, device=device)
    zero = torch.zeros(64, k // group, dtype=scale_dtype, device=device) if asym else 8
    layer.pack(q, s, zero, None, fma_mode=False)
    meta = layer.get_meta_args()
    assert meta[10] == 3, f"gemlite chose W_group_mode {meta[10]}, expected 3 ((q - zero) * scale)"
    return tuple(meta)


@functools.lru_cache(maxsize=None)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def run(cfg: dict, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
        group: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` through gemlite's ``cfg['TYPE']`` kernel, ``x`` [M, K] float16."""
    _, core = _module()
    _seed_config(cfg["TYPE"], x.shape[0], packed.shape[1], packed.shape[0] * PACKED_PER_WORD, group)
    meta = list(_meta_args(group, zeros is not None, scales.dtype, x.device))
    zero = _scalar(8, torch.int32, x.device) if zeros is None else zeros
    args = [packed, scales, zero, _scalar(1.0, torch.float32, x.device)]
    return core.forward_functional(x, bias, args, meta, core.GEMLITE_MATMUL_TYPES.index(cfg["TYPE"]))
