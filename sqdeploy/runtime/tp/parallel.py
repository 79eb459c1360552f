"""The collectives of tensor parallelism, and the modules that need them.

Megatron/TensorRT-LLM layout: column-parallel linears (q, k, v, gate, up) need no
communication; a row-parallel linear (o, down) produces a partial sum that is
all-reduced, and its bias is added once, afterwards; the vocabulary is split over
the ranks for the embedding (each rank looks up the ids it owns, the rest are zeros,
then an all-reduce) and for the LM head (each rank computes its block of logits,
then an all-gather). The same code runs over NCCL on GPUs and over gloo on CPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Comm:
    """A process group (``None``: a single rank, every collective is the identity).

    ``stage_on_cpu``: copy CUDA tensors to the host around each collective (gloo has no
    all-gather of CUDA tensors); only for checking sharded GPU kernels without NCCL.
    """

    def __init__(self, group=None, world: int = 1, stage_on_cpu: bool = False):
        self.group, self.world, self.stage_on_cpu = group, world, stage_on_cpu

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            if self.stage_on_cpu and t.is_cuda:
                host = t.cpu()
                dist.all_reduce(host, group=self.group)
                t.copy_(host)
            else:
                dist.all_reduce(t, group=self.group)
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dimension (rank order)."""
        if self.world == 1:
            return t
        src = t.contiguous().cpu() if self.stage_on_cpu else t.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world)]
        dist.all_gather(parts, src, group=self.group)
        return torch.cat(parts, dim=-1).to(t.device)


class RowParallel(nn.Module):
    """A row-parallel linear: local partial product, all-reduce, then the bias once.

    An INT8-activation linear hands over float32 partial sums, so tp N rounds the layer's
    output to float16 once, after the all-reduce, as tp 1 does: float16 partials would round
    twice, and the next INT8 quantization turns such last-bit differences into whole steps
    (greedy tokens of tp 2 then drift from tp 1's on near ties). Twice the all-reduce bytes.
    """

    def __init__(self, linear: nn.Module, bias: torch.Tensor | None, comm: Comm):
        super().__init__()
        self.linear, self.comm = linear, comm
        self.register_buffer("bias", bias, persistent=False)
        self.out_dtype = getattr(linear, "out_dtype", None)
        if comm.world > 1 and getattr(linear, "int8_activations", False):
            linear.out_dtype = torch.float32

    def forward(self, x):
        y = self.comm.all_reduce_(self.linear(x))
        if self.out_dtype is not None and y.dtype != self.out_dtype:
            y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


class ShardedEmbedding(nn.Module):
    """Rows ``first .. first + rows`` of a table whose other rows live on the other ranks.

    ``offset`` is subtracted from the ids first (OPT's position table stores no rows for
    the two offset positions HF keeps). Unsplit tables (``split=False``) need no collective.
    """

    def __init__(self, weight: torch.Tensor, first: int, offset: int, split: bool, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.first, self.offset, self.split, self.comm = first, offset, split, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.offset - self.first
        if not self.split:
            return F.embedding(local, self.weight)
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = out * inside[..., None].to(out.dtype)
        return self.comm.all_reduce_(out)


class VocabParallelHead(nn.Module):
    """LM head over this rank's block of the (zero-padded) vocabulary; logits gathered and cut to ``vocab``."""

    def __init__(self, weight: torch.Tensor, vocab: int, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab, self.comm = vocab, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.gather_last(F.linear(x, self.weight))[..., : self.vocab]
