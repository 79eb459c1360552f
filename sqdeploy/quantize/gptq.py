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

import functools
import logging
import os

import torch

from sqdeploy.core import phases, qmath
from sqdeploy.core.schemes import WeightScheme

BLOCK = 128
log = logging.getLogger(__name__)


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
    if static:
        gidx = torch.tensor(group_of, device=w.device)
        for b0 in range(0, in_f, BLOCK):
            b1 = min(b0 + BLOCK, in_f)
            s_blk = s_rows.index_select(1, gidx[b0:b1])
            z_blk = None if z_rows is None else z_rows.index_select(1, gidx[b0:b1])
            err1 = _static_block(w[:, b0:b1], s_blk, z_blk, hinv[b0:b1, b0:b1], q_cols[:, b0:b1], scheme.qmin, scheme.qmax)
            w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    elif BLOCK % group == 0:  # per group, scales from the columns as they are reached (after earlier groups' errors)
        for b0 in range(0, in_f, BLOCK):
            b1 = min(b0 + BLOCK, in_f)
            g0, g1 = b0 // group, -(-b1 // group)
            err1 = _group_block(w[:, b0:b1], None if clip is None else clip[:, g0:g1], scales[:, g0:g1],
                                None if zeros is None else zeros[:, g0:g1], hinv[b0:b1, b0:b1], q_cols[:, b0:b1], scheme, group)
            w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    else:  # groups wider than a block: a group's scales, set at its first column, carry over into the next blocks
        for b0 in range(0, in_f, BLOCK):
            b1 = min(b0 + BLOCK, in_f)
            if b0 % group == 0:
                g = b0 // group
                s, z = qmath.weight_qparams(w[:, b0:b1], col_scheme, None if clip is None else clip[:, g : g + 1])
                scales[:, g], cur_s = s[:, 0], s[:, :1]
                cur_z = None
                if z is not None:
                    zeros[:, g], cur_z = z[:, 0], z[:, :1]
            width = b1 - b0
            err1 = _static_block(w[:, b0:b1], cur_s.expand(-1, width), None if cur_z is None else cur_z.expand(-1, width),
                                 hinv[b0:b1, b0:b1], q_cols[:, b0:b1], scheme.qmin, scheme.qmax)
            w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    if act_order:
        q_all[:, perm] = q_cols
    out = qmath.QWeight(q=q_all, scale=scales, zero=None if zeros is None else zeros.to(torch.int8))
    phases.lap("GPTQ")
    return out


def _round_column(w1, j: int, cur_s, cur_z, hinv1, q_out, err1, qmin: int, qmax: int) -> None:
    """Rounds column ``j`` of the block ``w1`` into ``q_out`` and spreads its error over the block's
    later columns (in place; the error, scaled by the inverse Hessian's diagonal, into ``err1[:, j]``)."""
    x = w1[:, j]
    q = torch.round(x / cur_s) + (0 if cur_z is None else cur_z)
    q = q.clamp(qmin, qmax)
    q_out.copy_(q.to(torch.int8))
    deq = (q - (0 if cur_z is None else cur_z)) * cur_s
    e = (x - deq) / hinv1[j, j]
    w1[:, j:] -= e[:, None] * hinv1[j, j:][None, :]
    err1[:, j] = e


def _static_loop(w1, s, z, h, q, err, *, qmin: int, qmax: int) -> None:
    """Every column of one block with its scales fixed (``s``/``z``: column j's in column j)."""
    for j in range(w1.shape[1]):
        _round_column(w1, j, s[:, j], None if z is None else z[:, j], h, q[:, j], err, qmin, qmax)


def _group_loop(w1, clip, s, z, h, q, err, *, scheme: WeightScheme, group: int) -> None:
    """Every column of one block whose groups get their scales as they are reached (into ``s``/``z``,
    one column per group of the block; ``clip``: each group's range shrink)."""
    col_scheme = WeightScheme(scheme.bits, "channel", None, scheme.symmetric)
    for j in range(w1.shape[1]):
        if j % group == 0:
            g = j // group
            sg, zg = qmath.weight_qparams(w1[:, j : j + group], col_scheme, None if clip is None else clip[:, g : g + 1])
            s[:, g], cur_s = sg[:, 0], sg[:, 0]
            cur_z = None
            if zg is not None:
                z[:, g], cur_z = zg[:, 0], zg[:, 0]
        _round_column(w1, j, cur_s, cur_z, h, q[:, j], err, scheme.qmin, scheme.qmax)


class _GraphedLoop:
    """A block loop captured once as a CUDA graph on static buffers, replayed per block.

    A block is 128 columns of about ten tiny kernels each: launched one by one from Python, a
    7B layer's 35,600 columns cost seconds of launch time while the GPU idles. Replayed, the same
    kernels run with the same arguments on the buffers, so the integers are those of the eager
    loop; :func:`_graphed` checks that bit for bit once per shape and keeps the eager loop (saying
    so) if not.
    """

    def __init__(self, loop, buffers: dict[str, torch.Tensor | None], device: torch.device):
        self.buf = buffers
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            loop(**buffers)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loop(**buffers)

    def __call__(self, **inputs: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        for name, t in inputs.items():
            if t is not None:
                self.buf[name].copy_(t)
        self.graph.replay()
        return self.buf


_GRAPHS: dict[tuple, _GraphedLoop | None] = {}  # per loop and block shape; None: checked and not used


def _buffers(out_f: int, width: int, names: tuple[str, ...], per_group: int, device) -> dict[str, torch.Tensor | None]:
    """Static buffers of a block loop, with harmless values for the warm-up run."""
    f32 = dict(device=device, dtype=torch.float32)
    cols = {"s": per_group, "z": per_group, "clip": per_group}
    make = {"h": lambda: torch.eye(width, **f32), "q": lambda: torch.zeros(out_f, width, device=device, dtype=torch.int8),
            "s": lambda: torch.ones(out_f, cols["s"], **f32), "clip": lambda: torch.ones(out_f, cols["clip"], **f32)}
    return {n: make.get(n, lambda n=n: torch.zeros(out_f, cols.get(n, width), **f32))() for n in names}


def _graphed(key: tuple, loop, make_buffers, inputs: tuple[str, ...], outputs: tuple[str, ...], qmin: int, qmax: int):
    """The captured ``loop`` for this shape (``make_buffers()``: its static buffers), built and checked
    against the eager loop on first use; None where the eager loop must run."""
    if key in _GRAPHS:
        return _GRAPHS[key]
    buffers = make_buffers()
    if len(_GRAPHS) >= 16:  # a few shapes per model; drop the oldest
        _GRAPHS.pop(next(iter(_GRAPHS)))
    device = buffers["w1"].device
    try:
        g = _GraphedLoop(loop, buffers, device)
        gen = torch.Generator(device=device).manual_seed(0)
        out_f, width = buffers["w1"].shape
        a = torch.randn(width, width, device=device, generator=gen) / width**0.5
        rand = {"w1": lambda t: torch.randn(t.shape, device=device, generator=gen),
                "s": lambda t: 0.05 + torch.rand(t.shape, device=device, generator=gen),
                "clip": lambda t: 0.7 + 0.3 * torch.rand(t.shape, device=device, generator=gen),
                "z": lambda t: torch.randint(qmin, qmax + 1, t.shape, device=device, generator=gen).float(),
                "h": lambda t: torch.linalg.cholesky(a @ a.t() + torch.eye(width, device=device), upper=True)}
        data = {n: None if buffers[n] is None else rand[n](buffers[n]) for n in inputs}
        ref = {n: (None if t is None else t.clone()) for n, t in buffers.items()}
        ref.update({n: (None if t is None else t.clone()) for n, t in data.items()})
        loop(**ref)
        got = g(**data)
        if not all(torch.equal(got[n], ref[n]) for n in outputs if ref[n] is not None):
            raise RuntimeError("the replayed block differs from the eager loop")
    except Exception as exc:  # noqa: BLE001 - a correct (slower) path exists: use it and say why
        log.warning("GPTQ: column loop %s not captured in a CUDA graph (%s: %s); running it eagerly",
                    key[:4], type(exc).__name__, exc)
        g = None
    _GRAPHS[key] = g
    return g


def _use_graphs(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("SQDEPLOY_GPTQ_GRAPHS", "1") != "0"


def _static_block(w1, s_blk, z_blk, hinv1, q_blk, qmin: int, qmax: int) -> torch.Tensor:
    """One block of GPTQ with fixed scales: its integers into ``q_blk``; returns the block's scaled
    errors, which the caller feeds to the columns after it. On a GPU the loop replays from a CUDA
    graph (``SQDEPLOY_GPTQ_GRAPHS=0``: never)."""
    out_f, width = w1.shape
    loop = functools.partial(_static_loop, qmin=qmin, qmax=qmax)
    if _use_graphs(w1):
        names = ("w1", "s", "z", "h", "q", "err") if z_blk is not None else ("w1", "s", "h", "q", "err")
        key = ("static", out_f, width, z_blk is not None, qmin, qmax, w1.device)
        g = _graphed(key, loop, lambda: {"z": None, **_buffers(out_f, width, names, width, w1.device)},
                     ("w1", "s", "z", "h"), ("q", "err"), qmin, qmax)
        if g is not None:
            got = g(w1=w1, s=s_blk, z=z_blk, h=hinv1)
            q_blk.copy_(got["q"])
            return got["err"].clone()
    w1 = w1.clone()
    err1 = torch.zeros_like(w1)
    loop(w1=w1, s=s_blk, z=z_blk, h=hinv1, q=q_blk, err=err1)
    return err1


def _group_block(w1, clip_blk, s_out, z_out, hinv1, q_blk, scheme: WeightScheme, group: int) -> torch.Tensor:
    """One block of GPTQ whose group scales are computed as its columns are reached: integers into
    ``q_blk``, the block's scales and zero points into ``s_out``/``z_out``; returns the scaled errors.
    Replayed from a CUDA graph on a GPU, as :func:`_static_block`."""
    out_f, width = w1.shape
    loop = functools.partial(_group_loop, scheme=scheme, group=group)
    zero = not scheme.symmetric
    if _use_graphs(w1) and width % group == 0:
        names = ("w1", "s", "h", "q", "err") + (("z",) if zero else ()) + (("clip",) if clip_blk is not None else ())
        key = ("group", out_f, width, zero, clip_blk is not None, scheme, group, w1.device)
        g = _graphed(key, loop, lambda: {"z": None, "clip": None, **_buffers(out_f, width, names, width // group, w1.device)},
                     ("w1", "clip", "h"), ("q", "err", "s", "z"), scheme.qmin, scheme.qmax)
        if g is not None:
            got = g(w1=w1, clip=clip_blk, h=hinv1)
            q_blk.copy_(got["q"])
            s_out.copy_(got["s"])
            if zero:
                z_out.copy_(got["z"])
            return got["err"].clone()
    w1 = w1.clone()
    err1 = torch.zeros_like(w1)
    loop(w1=w1, clip=clip_blk, s=s_out, z=z_out, h=hinv1, q=q_blk, err=err1)
    return err1


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
