"""A KV cache that lives on the device for a server's whole life: fixed slots, per-row lengths.

Each layer holds keys and values ``[slots, kv_heads, max_len, head_dim]``, allocated once.
A request owns one slot from admission to its end: its prefill writes positions
``0 .. prompt-1`` of that slot only, each decode step writes one more position, and
finishing resets only that slot's length. Nothing is ever concatenated, padded or
copied between rows, so admitting or retiring a request costs nothing for the others.

A decode step runs the rows ``0 .. n-1`` (``n`` a batch-size bucket covering every
decoding slot; free slots are handed out lowest first, so the live ones stay packed at the
front). Each row reads its own position from ``lengths`` on the device, writes its key and
value there, and attends over its own prefix (the flash-decoding kernel takes one length
per row). Rows of the bucket that are not decoding (free, or between prefill chunks)
compute a throw-away row: they write at their own current length, a position no one
has read yet and the row's next real write replaces, and their length does not move.
That keeps the step free of host synchronisation and of data-dependent shapes, so each
bucket is captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.kernels import ops
from sqdeploy.kernels.model import KernelContext, KernelTransformer, additive, attention
from sqdeploy.kernels.reference import InputQuant

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
GIB = 1 << 30


def bucket_for(n: int, limit: int) -> int:
    """The smallest bucket holding ``n`` rows (at most ``limit``, the number of slots)."""
    for b in BUCKETS:
        if b >= n:
            return min(b, limit)
    return limit


def kv_bytes_per_token(model: KernelTransformer) -> int:
    """Bytes one token occupies in the cache over all layers (keys and values)."""
    attn = model.layers[0].attn
    elem = model.embed.weight.element_size()
    return 2 * len(model.layers) * attn.kv_heads * model.cfg.head_dim * elem


@dataclass(frozen=True)
class SlotPlan:
    """How many sequences of how many positions the cache holds, and why."""

    slots: int
    max_len: int
    bytes_per_token: int
    budget_bytes: int | None

    @property
    def tokens(self) -> int:
        return self.slots * self.max_len

    @property
    def gib(self) -> float:
        return self.tokens * self.bytes_per_token / GIB

    def describe(self) -> str:
        src = "" if self.budget_bytes is None else f" of a {self.budget_bytes / GIB:.2f} GiB budget"
        return (f"KV cache: {self.tokens} tokens ({self.slots} slots x {self.max_len} positions, "
                f"{self.gib:.2f} GiB{src}, {self.bytes_per_token} bytes/token)")


def plan_slots(bytes_per_token: int, max_len: int, max_batch: int, budget_bytes: int | None) -> SlotPlan:
    """Slots for ``max_batch`` sequences of ``max_len`` positions, fewer if the budget holds fewer.

    A budget too small for a single sequence is refused with what to change.
    """
    if max_len < 2:
        raise SqDeployError(f"the KV cache needs at least 2 positions per sequence (got {max_len})")
    if budget_bytes is None:
        return SlotPlan(max_batch, max_len, bytes_per_token, None)
    fits = int(budget_bytes // bytes_per_token)
    if fits < max_len:
        need = max_len * bytes_per_token / GIB
        raise SqDeployError(
            f"the KV cache budget ({budget_bytes / GIB:.3f} GiB, {max(fits, 0)} tokens) cannot hold one sequence of "
            f"{max_len} positions ({need:.3f} GiB); raise --kv-cache-gib / --gpu-memory-fraction or lower --max-model-len"
        )
    return SlotPlan(min(max_batch, fits // max_len), max_len, bytes_per_token, budget_bytes)


class SlotCache:
    """The cache tensors, per-slot lengths (on the device, mirrored on the host) and the free list."""

    def __init__(self, model: KernelTransformer, plan: SlotPlan):
        w = model.embed.weight
        attn = model.layers[0].attn
        shape = (plan.slots, attn.kv_heads, plan.max_len, model.cfg.head_dim)
        # zeros, not empty: positions beyond a row's length still enter SDPA's weighted sum with weight 0
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.plan = plan
        self.slots, self.max_len, self.device = plan.slots, plan.max_len, w.device
        self.lengths = torch.zeros(plan.slots, dtype=torch.long, device=w.device)
        self.active = torch.zeros(plan.slots, dtype=torch.long, device=w.device)  # 1: decodes this step
        self.next_ids = torch.zeros(plan.slots, dtype=torch.long, device=w.device)  # each row's next input
        self.rows = torch.arange(plan.slots, device=w.device)
        self.host_lengths = [0] * plan.slots
        self._free = list(range(plan.slots))

    # -- bookkeeping (host only)
    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise SqDeployError("no free KV cache slot; the scheduler admits only while one is free")
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        """Give a slot back: only its own length and flags are reset (its old keys are never read again)."""
        if slot in self._free or not 0 <= slot < self.slots:
            raise SqDeployError(f"slot {slot} is not in use")
        self.host_lengths[slot] = 0
        self.lengths[slot] = 0
        self.active[slot] = 0
        self._free.append(slot)

    def used(self) -> list[int]:
        free = set(self._free)
        return [s for s in range(self.slots) if s not in free]


@dataclass
class SlotContext(KernelContext):
    """What a slot forward's attention needs besides the usual rotary tables."""

    slot: int = -1  # prefill: the first slot written; decode: -1 (rows 0..n-1)
    slots: tuple[int, ...] = ()  # prefill: the slot of each row of the chunk
    start: int = 0  # prefill: the position of the chunk's first token
    start_t: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # decode: each row's write position [n]
    q_pos: torch.Tensor | None = None  # prefill: query positions [T]


def _window(model: KernelTransformer) -> int | None:
    return model.cfg.sliding_window


def _embed(model: KernelTransformer, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    x = model.embed(ids)
    if model.pos_embed is not None:
        x = x + model.pos_embed(position_ids + model.cfg.pos_offset)
    return x


def _rotary(model, ctx: SlotContext, position_ids: torch.Tensor, dtype) -> None:
    if model.rotary is not None:
        ctx.cos, ctx.sin = (t.to(dtype).contiguous() for t in model.rotary(position_ids))


def _layers(model: KernelTransformer, x: torch.Tensor, b: int, t: int, ctx: SlotContext, cache: SlotCache):
    """The decoder layers as :class:`~sqdeploy.kernels.model.KernelBlock` runs them, with slot attention."""
    pending = None
    for block in model.layers:
        h, a_in = ops.add_norm(x, pending, block.attn_norm, block.attn.input_quant())
        attn_out = _attention(block.attn, a_in, b, t, ctx, cache, block.index, _window(model))
        x, m_in = ops.add_norm(h, attn_out, block.mlp_norm, block.mlp.input_quant())
        pending = block.mlp(m_in)
    return x, pending


def _attention(attn, x_in, b: int, t: int, ctx: SlotContext, cache: SlotCache, layer: int, window) -> torch.Tensor:
    d, h, hkv = attn.cfg.head_dim, attn.heads, attn.kv_heads
    qkv = attn.qkv(x_in) if attn.fused else torch.cat([lin(x_in) for lin in attn.qkv], dim=-1)
    qkv = qkv.view(b, t, (h + 2 * hkv) * d)
    kc, vc = cache.k[layer], cache.v[layer]
    if ctx.slot < 0:  # decode: one token for each of rows 0..b-1, each at its own position
        q, k, v = ops.rope_qkv(qkv, ctx.cos, ctx.sin, h, hkv, d)
        rows = cache.rows[:b]
        kc[rows, :, ctx.positions] = k[:, :, 0].to(kc.dtype)
        vc[rows, :, ctx.positions] = v[:, :, 0].to(vc.dtype)
        kv_k, kv_v = kc[:b], vc[:b]
        out = ops.decode_attention(q.reshape(b, h, d), kv_k, kv_v, ctx.length, window)
        if out is not None:
            return attn.o(out.reshape(b, h * d))
        if ctx.mask is None:
            k_idx = torch.arange(cache.max_len, device=q.device)
            allowed = k_idx[None, :] <= ctx.positions[:, None]
            if window is not None:
                allowed &= (ctx.positions[:, None] - k_idx[None, :]) < window
            ctx.mask = additive(allowed[:, None, None], q.dtype)
        out = attention(q.transpose(1, 2), kv_k, kv_v, ctx)
        return attn.o(out.transpose(1, 2).reshape(b, h * d))
    end, outs = ctx.start + t, []
    for row, s in enumerate(ctx.slots):  # the linears ran on every row at once; each row's cache is its own
        q = ops.rope_cache(qkv[row : row + 1], ctx.cos, ctx.sin, kc[s : s + 1], vc[s : s + 1], ctx.start_t, h, hkv, d)
        outs.append(attention(q.transpose(1, 2), kc[s : s + 1, :, :end], vc[s : s + 1, :, :end], ctx))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return attn.o(out.transpose(1, 2).reshape(b * t, h * d))


def _logits(model: KernelTransformer, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    _, y = ops.add_norm(x, pending, model.final_norm, InputQuant())
    return model.lm_head(y).float()


@torch.no_grad()
def prefill_chunk(model: KernelTransformer, cache: SlotCache, slot: int, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run prompt tokens ``ids`` [T] of ``slot`` at positions ``start ..``; float32 logits of the last one [V].

    Writes only that slot's positions ``start .. start+T-1`` and moves its length there.
    """
    return prefill_rows(model, cache, [slot], ids[None], start)[0]


@torch.no_grad()
def prefill_rows(model: KernelTransformer, cache: SlotCache, slots: list[int], ids: torch.Tensor,
                 start: int) -> torch.Tensor:
    """:func:`prefill_chunk` of several slots at once: ``ids`` [B, T] (row ``i`` goes to ``slots[i]``), every
    row at positions ``start ..``; float32 logits of each row's last token [B, V].

    The linears run on all ``B x T`` tokens in one GEMM each (a server admitting 32 prompts of 512 tokens
    runs eight 4096-row GEMMs, not thirty-two 512-row ones); rotary, the cache writes and attention run per
    row on that row's slot only, so the result equals one :func:`prefill_chunk` per row up to the GEMMs'
    summation order.
    """
    b, t = ids.shape
    if len(slots) != b or len(set(slots)) != b:
        raise SqDeployError(f"prefill of {b} rows needs {b} distinct slots, got {list(slots)}")
    for slot in slots:
        if start != cache.host_lengths[slot]:
            raise SqDeployError(f"slot {slot} holds {cache.host_lengths[slot]} positions; a chunk at {start} would leave a gap")
    if start + t > cache.max_len:
        raise SqDeployError(f"a slot holds {cache.max_len} positions; {start + t} needed")
    dev = cache.device
    q_pos = torch.arange(start, start + t, device=dev)
    x = _embed(model, ids.to(dev), q_pos[None].expand(b, t))
    window = _window(model)
    fresh = start == 0 and (window is None or t <= window)
    mask = None
    if not fresh:
        k_idx = torch.arange(start + t, device=dev)
        allowed = k_idx[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= (q_pos[:, None] - k_idx[None, :]) < window
        mask = additive(allowed[None, None], x.dtype)
    ctx = SlotContext(mask=mask, causal=fresh, slot=slots[0], slots=tuple(slots), start=start,
                      start_t=torch.tensor([start], dtype=torch.long, device=dev), q_pos=q_pos)
    _rotary(model, ctx, q_pos[None], x.dtype)
    x, pending = _layers(model, x.reshape(b * t, -1), b, t, ctx, cache)
    for slot in slots:
        cache.host_lengths[slot] = start + t
        cache.lengths[slot] = start + t
    last = torch.arange(1, b + 1, device=dev) * t - 1  # each row's last token
    return _logits(model, x[last], None if pending is None else pending[last])


def decode_rows(model: KernelTransformer, cache: SlotCache, n: int) -> torch.Tensor:
    """One decode step of rows ``0 .. n-1`` (inputs ``next_ids``); float32 logits [n, V].

    Rows flagged in ``active`` advance their length by one; the others are left as they were.
    Host-synchronisation free: this is what each bucket's CUDA graph captures.
    """
    positions = cache.lengths[:n].clamp(max=cache.max_len - 1)
    x = _embed(model, cache.next_ids[:n, None], positions[:, None])
    ctx = SlotContext(mask=None, causal=False, length=positions + 1, positions=positions)
    _rotary(model, ctx, positions[:, None], x.dtype)
    x, pending = _layers(model, x.reshape(n, -1), n, 1, ctx, cache)
    logits = _logits(model, x, pending)
    cache.lengths[:n] += cache.active[:n]
    return logits


class SlotDecoder:
    """Decode steps per bucket, replayed from CUDA graphs on the GPU (eager elsewhere, or when capture fails)."""

    def __init__(self, model: KernelTransformer, cache: SlotCache, use_graphs: bool = True, log=print):
        self.model, self.cache, self.log = model, cache, log
        self.use_graphs = use_graphs and cache.device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: set[int] = set()
        self.replays = 0
        self.pool = None

    @torch.no_grad()
    def step(self, slots: list[int]) -> torch.Tensor:
        """Logits [n, V] of rows 0..n-1 (``n`` the bucket of the highest slot); rows ``slots`` advance."""
        c = self.cache
        n = bucket_for(max(slots) + 1, c.slots)
        for s in slots:
            if c.host_lengths[s] >= c.max_len:
                raise SqDeployError(f"slot {s} is full ({c.max_len} positions); the request should have ended")
        if self.use_graphs and n not in self.failed:
            graph = self.graphs.get(n) or self._capture(n)
            if graph is not None:
                graph[0].replay()
                self.replays += 1
                out = graph[1]
            else:
                out = decode_rows(self.model, c, n)
        else:
            out = decode_rows(self.model, c, n)
        for s in slots:
            c.host_lengths[s] += 1
        return out

    def _capture(self, n: int):
        c = self.cache
        saved = c.lengths.clone()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # kernel tuning and lazy allocations happen outside the capture
                decode_rows(self.model, c, n)
            torch.cuda.current_stream().wait_stream(side)
            c.lengths.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = decode_rows(self.model, c, n)
            c.lengths.copy_(saved)  # capture records, it does not run; undo nothing else
            self.graphs[n] = (graph, out)
            return self.graphs[n]
        except Exception as exc:  # noqa: BLE001 - capture is an optimisation; eager decode is still correct
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - a capture that ended badly may leave an error to clear
                pass
            c.lengths.copy_(saved)
            self.failed.add(n)
            self.log(f"CUDA graph capture of the batch-{n} decode step failed ({type(exc).__name__}: {exc}); "
                     "running it eagerly")
            return None

    def capture_all(self) -> list[int]:
        """Capture every bucket up to the number of slots now (largest first, so smaller ones reuse its memory)."""
        if not self.use_graphs:
            return []
        done = []
        for n in sorted({bucket_for(b, self.cache.slots) for b in BUCKETS if b <= self.cache.slots} | {self.cache.slots},
                        reverse=True):
            if n not in self.graphs and n not in self.failed and self._capture(n) is not None:
                done.append(n)
        return sorted(done)
