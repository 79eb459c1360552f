"""Smoothing is an exact reparametrisation: an unquantized smoothed model computes the same logits."""

import pytest
import torch

from sqdeploy.model import HFCheckpoint, load_model
from sqdeploy.quantize.smoothing import fold, smooth_block, smoothquant_scale, usable_groups
from sqdeploy.quantize.streaming import StatsCollector


def _smoothed_logits(model, groups, cfg, ids, alpha):
    x, ctx = model.prepare(ids)
    for block in model.layers:
        with StatsCollector(block, cfg.linears) as c:
            block(x, ctx)
        smooth_block(block, cfg, groups, c.stats, lambda g, xs, _m, w: smoothquant_scale(xs, w, alpha))
        x = block(x, ctx)
    return model.head(x)


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_smoothing_preserves_logits(tiny_model, alpha):
    ck = HFCheckpoint(tiny_model)
    cfg = ck.config
    groups = usable_groups(ck.family.smoothing_groups, cfg)
    assert {g.kind for g in groups} == {"norm", "linear", "gqa"}  # every kind is exercised
    model = load_model(ck)
    ids = torch.randint(0, 2000, (2, 48))
    with torch.no_grad():
        ref = model(ids)
        out = _smoothed_logits(model, groups, cfg, ids, alpha)
    # fp32 tolerance: a 1% wrong fold fails this by orders of magnitude
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


def test_a_wrong_fold_is_caught(tiny_models):
    """The equivalence check above must be able to fail: skip the producer fold of one group."""
    ck = HFCheckpoint(tiny_models["llama"])
    model = load_model(ck)
    ids = torch.randint(0, 2000, (1, 32))
    with torch.no_grad():
        ref = model(ids)
        block = model.layers[0]
        group = ck.family.smoothing_groups[0]
        s = torch.full((ck.config.hidden_size,), 1.01)
        for name in group.consumers:
            block.linear(name).weight.mul_(s)  # consumers scaled, producer not divided
        out = model(ids)
    assert not torch.allclose(out, ref, rtol=1e-5, atol=2e-5)


def test_gqa_fold_shares_scale_across_query_heads(tiny_models):
    ck = HFCheckpoint(tiny_models["llama"])
    cfg = ck.config
    block = load_model(ck).layers[0]
    group = next(g for g in ck.family.smoothing_groups if g.kind == "gqa")
    s = torch.rand(cfg.kv_size) + 0.5
    o_before = block.linear("o").weight.clone()
    fold(block, group, s, cfg)
    ratio = (block.linear("o").weight / o_before)[0].view(cfg.num_heads, cfg.head_dim)
    rep = cfg.num_heads // cfg.num_kv_heads
    for h in range(cfg.num_heads):
        torch.testing.assert_close(ratio[h], s.view(cfg.num_kv_heads, cfg.head_dim)[h // rep])


def test_hessian_sums_are_shared_and_exact(tiny_models):
    """Linears fed the same input share one x^T x accumulator, added to once per batch, and it
    equals the sum over every batch (a double-counted or missed batch fails this); smoothing
    keeps the sharing."""
    ck = HFCheckpoint(tiny_models["llama"])
    cfg = ck.config
    model = load_model(ck)
    block = model.layers[0]
    seen: list[torch.Tensor] = []
    handle = block.linear("q").register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad(), StatsCollector(block, cfg.linears, hessian=True) as c:
        for _ in range(3):
            x, ctx = model.prepare(torch.randint(0, 2000, (2, 16)))
            block(x, ctx)
    handle.remove()
    st = c.stats
    assert st["q"].xtx is st["k"].xtx is st["v"].xtx and st["gate"].xtx is st["up"].xtx
    assert st["o"].xtx is not st["q"].xtx
    want = sum((t.float().t() @ t.float()).double() for t in seen)  # the collector's own arithmetic
    torch.testing.assert_close(st["q"].xtx, want, rtol=1e-9, atol=1e-9)
    groups = usable_groups(ck.family.smoothing_groups, cfg)
    _, smoothed = smooth_block(block, cfg, groups, st, lambda g, xs, _m, w: smoothquant_scale(xs, w, 0.5))
    assert smoothed["q"].xtx is smoothed["k"].xtx and smoothed["q"].xtx is not st["q"].xtx
    _, light = smooth_block(block, cfg, groups, st, lambda g, xs, _m, w: smoothquant_scale(xs, w, 0.5), with_xtx=False)
    assert light["q"].xtx is None
