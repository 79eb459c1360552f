"""One rank's model from a tensor-parallel checkpoint, built on the GPU kernels.

The checkpoint is read through the rank-source interface of
:class:`sqdeploy.formats.trtllm.reader.TrtllmCheckpoint` (``config``, ``tp``,
``rank_linear(rank, layer, name)``, ``rank_globals(rank)``), whose linears mean

    y_r = act_quant(x_r * pre_quant_scale) @ dequant(q, scale)^T (+ bias)

Each rank-local linear becomes a :class:`~sqdeploy.kernels.spec.LinearSpec` and then
the same kernel module a single-GPU model uses; o and down are wrapped in an
all-reduce, the embedding and the LM head in their vocabulary-parallel forms.
"""

from __future__ import annotations

import torch
from torch import nn

from sqdeploy.core.schemes import QuantScheme
from sqdeploy.kernels.spec import LinearSpec
from sqdeploy.kernels.swap import build_block, make_norm, shell
from sqdeploy.runtime.tp.parallel import Comm, RowParallel, ShardedEmbedding, VocabParallelHead

ROW_PARALLEL = ("o", "down")


def spec_from_rank(lin, drop_bias: bool = False) -> LinearSpec:
    """A rank's linear (TensorRT-LLM semantics) as a kernel spec.

    An all-ones pre-quant scale is dropped (it would only cost a multiply and block
    fusing the quantization into the norm). Additive INT4 zero points (TensorRT-LLM's
    experimental ``has_zero_point``) have no integer zero point, so such a linear runs
    on its dequantized float weight: the same numbers, without the INT4 speed-up.
    """
    pqs = lin.pre_quant_scale
    if pqs is not None and bool((pqs == 1).all()):
        pqs = None
    bias = None if drop_bias else lin.bias
    out_f, in_f = lin.out_features, lin.in_features
    if lin.q is None or lin.zero is not None:
        w = lin.weight if lin.q is None else lin.dequantized()
        return LinearSpec(out_f, in_f, QuantScheme(None), weight=w.float(), pre_quant_scale=pqs, bias=bias)
    act_scale = None if lin.act_scale is None else lin.act_scale.float().reshape(1)
    return LinearSpec(out_f, in_f, lin.scheme, q=lin.q, scale=lin.scale.float().reshape(out_f, -1),
                      act_scale=act_scale, pre_quant_scale=pqs, bias=bias)


def _split_table(weight: torch.Tensor, total: int, rank: int) -> tuple[int, bool]:
    """(first row, split?) of a rank's block of a table with ``total`` rows."""
    rows = weight.shape[0]
    split = rows < total
    return (rank * rows if split else 0), split


def _globals(ckpt, rank: int, comm: Comm, device, dtype):
    cfg = ckpt.config
    g = ckpt.rank_globals(rank)
    to = lambda t: t.to(device, dtype)  # noqa: E731
    first, split = _split_table(g["embed.weight"], cfg.vocab_size, rank)
    embed = ShardedEmbedding(to(g["embed.weight"]), first, 0, split, comm)
    pos = None
    if cfg.position == "learned":
        first, split = _split_table(g["pos_embed.weight"], cfg.max_positions, rank)
        pos = ShardedEmbedding(to(g["pos_embed.weight"]), first, cfg.pos_offset, split, comm)
    final = make_norm(cfg, g["final_norm.weight"], g.get("final_norm.bias"), device, dtype)
    head = VocabParallelHead(to(g["lm_head.weight"]), cfg.vocab_size, comm)
    return g, embed, pos, final, head


@torch.no_grad()
def build_rank_model(ckpt, rank: int, device, dtype: torch.dtype, comm: Comm | None = None):
    """Rank ``rank``'s :class:`~sqdeploy.kernels.model.KernelTransformer`; ``comm`` joins it to the others."""
    from sqdeploy.formats.trtllm.config import kv_heads_per_rank

    cfg, tp = ckpt.config, ckpt.tp
    comm = comm or Comm(None, 1)
    g, embed, pos, final, head = _globals(ckpt, rank, comm, device, dtype)
    model = shell(cfg, embed, pos, final, head, device)
    for i in range(cfg.num_layers):
        lins = {n: ckpt.rank_linear(rank, i, n) for n in cfg.linears}
        specs = {n: spec_from_rank(lin, drop_bias=n in ROW_PARALLEL) for n, lin in lins.items()}

        def wrap(name: str, linear: nn.Module, lins=lins) -> nn.Module:
            bias = lins[name].bias
            return RowParallel(linear, None if bias is None else bias.to(device, dtype), comm)

        norms = tuple(make_norm(cfg, g[f"layers.{i}.{n}.weight"], g.get(f"layers.{i}.{n}.bias"), device, dtype)
                      for n in ("attn_norm", "mlp_norm"))
        model.layers.append(build_block(cfg, i, specs, norms, device, dtype, cfg.num_heads // tp,
                                        kv_heads_per_rank(cfg, tp), wrap_row=wrap))
    return model.eval()
