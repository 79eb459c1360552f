"""GPTQ rounding (Frantar et al. 2023): quantize column by column, feeding each
column's rounding error forward into the columns not yet quantized, weighted by the
inverse Hessian ``H = 2 X^T X / n`` of the layer's inputs.

This is an alternative to round-to-nearest for the last step of any recipe
(``rounding: gptq``): smoothing (SmoothQuant, SmoothQuant+, AWQ scales) decides *what*
is quantized, GPTQ decides *how each weight rounds*. The integer grid, scales and
zero points are exactly those of :mod:`qmath` (computed per group as the columns are
reached), so every export target reads the result like any other.
"""

from __future__ import annotations

import torch

from sqdeploy.core import phases, qmath
from sqdeploy.core.schemes import WeightScheme

BLOCK = 128


class HessianCollector:
    """Accumulates ``X^T X`` of the inputs of a block's linears through forward pre-hooks."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.h: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            h = (x.t() @ x).double()
            if name in self.h:
                self.h[name] += h
                self.n[name] += x.shape[0]
            else:
                self.h[name], self.n[name] = h, x.shape[0]

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        return (2.0 * self.h[name] / self.n[name]).float()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: WeightScheme,
    damp: float = 0.01,
    clip: torch.Tensor | None = None,
    act_order: bool = False,
) -> qmath.QWeight:
    """GPTQ of ``w`` [out, in] with Hessian ``h`` [in, in]; ``clip`` [out, groups] shrinks group ranges.

    ``act_order`` rounds the columns with the largest Hessian diagonal (the most active
    input channels) first, while the most columns remain to absorb their error. Groups stay
    contiguous (what every export format stores, no ``g_idx``): with groups, their scales
    are then fixed from the unrounded weights before any column moves ("static groups").
    """
    phases.lap()  # the caller's section ends here
    w = w.detach().float().clone()
    out_f, in_f = w.shape
    h = h.to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_f, device=h.device)

    col_scheme = WeightScheme(scheme.bits, "channel", None, scheme.symmetric)
    group = scheme.group_size if scheme.granularity == "group" else None
    n_groups = qmath.num_groups(scheme, in_f)
    scales = torch.empty(out_f if scheme.granularity != "tensor" else 1, n_groups, device=w.device)
    zeros = None if scheme.symmetric else torch.empty_like(scales)
    q_all = torch.empty(out_f, in_f, dtype=torch.int8, device=w.device)
    static = group is None or act_order
    if static:  # scales fixed before the columns move: per row/tensor always, per group with act_order
        s, z = qmath.weight_qparams(w, scheme, clip)
        scales[:] = s
        if z is not None:
            zeros[:] = z
        s_rows = s.expand(out_f, n_groups)
        z_rows = None if z is None else z.expand(out_f, n_groups)
    perm = torch.arange(in_f, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    if static:  # each column's scale, as plain ints: indexing by a device scalar costs a kernel per column
        group_of = (perm // group).tolist() if group is not None else [0] * in_f
    q_cols = q_all if not act_order else torch.empty_like(q_all)  # column k: the k-th rounded (permuted order)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for b0 in range(0, in_f, BLOCK):
        b1 = min(b0 + BLOCK, in_f)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if static:
                g = group_of[col]
                cur_s, cur_z = s_rows[:, g], None if z_rows is None else z_rows[:, g]
            elif col % group == 0:
                g = col // group
                s, z = qmath.weight_qparams(w1[:, j : j + group], col_scheme, None if clip is None else clip[:, g : g + 1])
                scales[:, g], cur_s = s[:, 0], s[:, 0]
                cur_z = None
                if z is not None:
                    zeros[:, g], cur_z = z[:, 0], z[:, 0]
            x = w1[:, j]
            q = torch.round(x / cur_s) + (0 if cur_z is None else cur_z)
            q = q.clamp(scheme.qmin, scheme.qmax)
            q_cols[:, col] = q.to(torch.int8)
            deq = (q - (0 if cur_z is None else cur_z)) * cur_s
            e = (x - deq) / hinv1[j, j]
            w1[:, j:] -= e[:, None] * hinv1[j, j:][None, :]
            err1[:, j] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    if act_order:
        q_all[:, perm] = q_cols
    out = qmath.QWeight(q=q_all, scale=scales, zero=None if zeros is None else zeros.to(torch.int8))
    phases.lap("GPTQ")
    return out


def act_aware_sums(pairs, quantize) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Sums ``X^T Q(X')`` and ``Q(X')^T Q(X')`` (float32, as GPTQ's Hessian) per linear, over ``pairs`` of per-chunk
    input dicts ``(X, X')``: ``X`` what the float model feeds the linear, ``X'`` what the deployed
    model feeds it before rounding (the same tensor, or the quantized stream's)."""
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for xf, xin in pairs:
        for name, x in xf.items():
            xq = quantize(name, xin[name])
            cross, hq = x.t() @ xq, xq.t() @ xq  # summed where the inputs are (the layer's device)
            if name in sums:
                sums[name][0].add_(cross)
                sums[name][1].add_(hq)
            else:
                sums[name] = (cross, hq)
    return sums


def act_aware_target(w: torch.Tensor, cross: torch.Tensor, hq: torch.Tensor, damp: float) -> torch.Tensor:
    """The float weights that best map the rounded inputs onto the float outputs.

    ``min ||X W^T - Q(X) V^T||`` splits into ``||Q(X) (V* - V)^T||`` plus a constant, with
    ``V* = W X^T Q(X) (Q(X)^T Q(X))^-1``: GPTQ of ``V*`` with the Hessian of ``Q(X)`` then
    minimises the error of the deployed layer, activation rounding included. The damping pulls
    ``V*`` towards ``W`` (not towards zero, which would shrink rarely active channels).
    """
    h = hq.double().clone()
    lam = damp * torch.diag(h).mean()
    h += lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    w64 = w.double().to(h.device)
    rhs = (w64 @ cross.double() + lam * w64).t()
    return torch.linalg.solve(h, rhs).t().to(w.device, w.dtype)


# reference-block linears whose input tensor parallelism splits across ranks (row-parallel)
ROW_PARALLEL = ("o", "down")


def input_sharing(linears) -> list[tuple[str, ...]]:
    """Linears of ``linears`` (reference-block names) that read the same tensor (one Hessian each)."""
    groups = [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
    return [g for g in (tuple(n for n in grp if n in linears) for grp in groups) if g]


def collect_hessians(block, linears: tuple[str, ...], run) -> dict[str, torch.Tensor]:
    """Hessian of every linear's input, from one pass ``run(block)`` over calibration data."""
    sharing = input_sharing(linears)
    collector = HessianCollector({g[0]: block.linear(g[0]) for g in sharing})
    try:
        run(block)
    finally:
        collector.close()
    return {name: collector.hessian(g[0]) for g in sharing for name in g}
