"""Greedy decoding with a static KV cache, each decode step one CUDA-graph replay.

At batch 1 a 7B decode step is a few hundred small kernels; launched one by one from
Python the host becomes the bottleneck long before the GPU runs out of memory
bandwidth. The step here never synchronises with the host (positions, masks, the
next token and its bookkeeping all live on the device), so it is captured once and
replayed. Off CUDA the same step runs eagerly.
"""

from __future__ import annotations

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.kernels.model import KernelTransformer, StaticKVCache


def _capture(fn, pool=None) -> torch.cuda.CUDAGraph:
    """Run ``fn`` once eagerly on a side stream (kernel tuning, lazy allocations), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


class GraphedForward:
    """``model(ids, last_only=...)`` replayed from a CUDA graph, one graph per input shape.

    An eager forward of a prompt launches about 15 kernels a layer from Python, and at 20-40 us
    of host time per Triton launch the host, not the GPU, sets the pace of a 7B prefill. A
    captured forward costs one launch. Shapes are static per graph (a serving loop would bucket
    prompt lengths); the returned logits live in the graph's memory and are overwritten by the
    next call of the same shape.
    """

    def __init__(self, model: KernelTransformer, last_only: bool = True):
        self.model, self.last_only = model, last_only
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not ids.is_cuda:
            return self.model(ids, last_only=self.last_only)
        key = tuple(ids.shape)
        if key not in self.graphs:
            static = ids.clone()
            out = {}

            def run():
                out["logits"] = self.model(static, last_only=self.last_only)

            graph = _capture(run, self.pool)
            self.graphs[key] = (graph, static, out["logits"])
        graph, static, logits = self.graphs[key]
        static.copy_(ids)
        graph.replay()
        return logits


class GraphDecoder:
    def __init__(self, model: KernelTransformer, batch: int, max_len: int, use_graph: bool | None = None):
        self.model = model
        w = model.embed.weight
        kv_heads = model.layers[0].attn.kv_heads
        self.cache = StaticKVCache(len(model.layers), batch, max_len, kv_heads, model.cfg.head_dim, w.dtype, w.device)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=w.device)
        self.tokens = torch.zeros((batch, max_len), dtype=torch.long, device=w.device)
        self.use_graph = w.is_cuda if use_graph is None else use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.prompt_len = 0

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompts ``[B, T]``; returns the last position's logits ``[B, V]``."""
        if prompt.shape[0] != self.cache.batch:
            raise SqDeployError(f"decoder was built for batch {self.cache.batch}, got {prompt.shape[0]} prompts")
        self.cache.reset()
        self.prompt_len = prompt.shape[1]
        logits = self.model(prompt, cache=self.cache, last_only=True)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        self.tokens[:, self.prompt_len : self.prompt_len + 1] = nxt
        self.ids.copy_(nxt)
        return logits

    def _step(self) -> None:
        logits = self.model(self.ids, cache=self.cache, last_only=True)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        self.tokens.index_copy_(1, self.cache.pos, nxt)  # pos has advanced: the slot of the new token
        self.ids.copy_(nxt)
        self.logits = logits

    @torch.no_grad()
    def capture(self) -> None:
        """Capture one decode step (after :meth:`prefill`); the warm-up step is undone."""
        ids = self.ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # eager warm-up: kernel tuning and lazy allocations happen here
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.cache.pos.sub_(1)
        self.cache.length -= 1
        self.ids.copy_(ids)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.cache.length -= 1  # capture ran the host side once, not the step
        self.graph = graph

    @torch.no_grad()
    def step(self) -> None:
        if self.cache.length + 1 >= self.cache.max_len:
            raise SqDeployError(f"the static KV cache holds {self.cache.max_len} positions; decode ran out of room")
        if self.use_graph and self.graph is None:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
            self.cache.length += 1
        else:
            self._step()

    def generated(self, n: int) -> torch.Tensor:
        """The first ``n`` generated tokens per row ``[B, n]`` (the prefill's token included)."""
        return self.tokens[:, self.prompt_len : self.prompt_len + n]


@torch.no_grad()
def greedy_generate(model: KernelTransformer, prompts: list[list[int]], max_new_tokens: int,
                    use_graph: bool | None = None) -> list[list[int]]:
    """Greedy continuations of equal-length prompts (no EOS handling: exactly ``max_new_tokens`` each)."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise SqDeployError("greedy_generate takes equal-length prompts; pad them or run them one by one")
    device = model.embed.weight.device
    dec = GraphDecoder(model, len(prompts), lengths.pop() + max_new_tokens + 1, use_graph)
    dec.prefill(torch.tensor(prompts, device=device))
    for _ in range(max_new_tokens - 1):
        dec.step()
    return dec.generated(max_new_tokens).tolist()


def matching_lead(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share (where they part, on a near tie)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
