"""Rounding options: GPTQ with the activation rounding in its objective (``gptq_act_aware``), searched static scales."""

import torch

from sqdeploy.core import qmath
from sqdeploy.core.schemes import ActScheme, WeightScheme
from sqdeploy.quantize.gptq import act_aware_sums, act_aware_target, gptq_quantize, input_sharing

W8 = WeightScheme(8, "channel", None, True)


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Activations as a transformer's are: correlated channels (low rank plus noise), a few
    outliers that set the per-tensor scale, many channels small next to that scale."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix = torch.randn(8, d, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 8, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)
    x[:, :3] *= 40.0
    return x


def _static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qmath.fake_quant_act(x, ActScheme("static_tensor"), scale)


def test_target_is_the_least_squares_fit_and_damping_pulls_to_w():
    x = _inputs(2000, 32, 0)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    xq = _static(x, qmath.act_scale(x.abs().amax()))
    sums = act_aware_sums([({"q": x}, {"q": x})], lambda _n, t: _static(t, qmath.act_scale(x.abs().amax())))
    cross, hq = sums["q"]
    torch.testing.assert_close(cross, x.t() @ xq)
    v = act_aware_target(w, cross, hq, damp=0.0)
    want = torch.linalg.lstsq(xq.double(), (x @ w.t()).double()).solution.t().float()
    torch.testing.assert_close(v, want, rtol=1e-3, atol=1e-3)
    assert (v - w).norm() > 0.01 * w.norm()  # the rounding is worth correcting for ...
    torch.testing.assert_close(act_aware_target(w, cross, hq, damp=1e6), w, rtol=1e-3, atol=1e-3)  # ... and damping keeps w
    exact = act_aware_target(w, (x.t() @ x).double(), (x.t() @ x).double(), damp=0.0)
    torch.testing.assert_close(exact, w, rtol=1e-4, atol=1e-4)  # unrounded inputs: nothing to correct


def test_act_aware_gptq_lowers_the_deployed_layer_error_on_new_inputs():
    """The point of the option: ``|| X W^T - Q(X) Wq^T ||`` on inputs GPTQ never saw."""
    calib, held = _inputs(4000, 64, 2), _inputs(4000, 64, 3)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    scale = qmath.act_scale(calib.abs().amax())

    def deployed_error(qw):
        wq = qmath.dequantize_weight(qw, W8)
        return float((held @ w.t() - _static(held, scale) @ wq.t()).norm() / (held @ w.t()).norm())

    plain = gptq_quantize(w, 2 * calib.t() @ calib / len(calib), W8, damp=0.01)
    cross, hq = act_aware_sums([({"x": calib}, {"x": calib})], lambda _n, t: _static(t, scale))["x"]
    aware = gptq_quantize(act_aware_target(w, cross, hq, 0.01), (2 * hq / len(calib)).float(), W8, damp=0.01)
    assert deployed_error(aware) < 0.9 * deployed_error(plain)


def test_input_sharing_keeps_only_present_linears():
    assert input_sharing(("q", "k", "v", "o", "gate", "up", "down")) == [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
    assert input_sharing(("q", "k", "v", "o", "up", "down")) == [("q", "k", "v"), ("o",), ("up",), ("down",)]
    assert input_sharing(("down", "o")) == [("o",), ("down",)]


def _w8a8(act_aware: bool, quantized_inputs: bool = False):
    from sqdeploy.quantize.recipes import parse_recipe

    return parse_recipe({
        "name": f"w8a8-aware{int(act_aware)}{int(quantized_inputs)}", "scheme": "O3",
        "algorithm": {"name": "smoothquant", "alpha": 0.5, "rounding": "gptq", "gptq_act_aware": act_aware,
                      "gptq_quantized_inputs": quantized_inputs},
    })


def test_act_aware_recipe_lowers_the_layers_error(tiny_models, calib_file):
    """End to end through the layer driver: the layers' recorded errors (quantized output,
    activation rounding included, against the float one on the calibration inputs) drop."""
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize

    cal = Calibration(str(calib_file), 8, 64)
    plain = quantize(tiny_models["llama"], _w8a8(False), cal, Runtime(progress=False))
    aware = quantize(tiny_models["llama"], _w8a8(True), cal, Runtime(progress=False))
    chained = quantize(tiny_models["llama"], _w8a8(True, True), cal, Runtime(progress=False))
    errors = [(p.error, a.error) for p, a in zip(plain.layers, aware.layers)]
    assert sum(a for _, a in errors) < sum(p for p, _ in errors), errors  # (-4% here; -30..50% per layer on the shared model)
    assert plain.layers[-1].accumulated_error is None and chained.layers[-1].accumulated_error is not None
    assert chained.layers[-1].accumulated_error < aware.layers[-1].error * 50  # finite, same order: the stream is used


def test_searched_static_scales_are_shared_by_linears_reading_one_input(tiny_models, calib_file):
    """TensorRT-LLM fuses q/k/v (and gate/up) into one GEMM with one activation scale."""
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_in_memory
    from sqdeploy.quantize.recipes import parse_recipe

    rec = parse_recipe({"name": "searched", "scheme": "O3",
                        "algorithm": {"name": "smoothquant", "alpha": 0.5, "act_scale_search": True}})
    model, _ = quantize_in_memory(tiny_models["llama"], rec, Calibration(str(calib_file), 4, 64), Runtime(progress=False))
    for block in model.layers:
        q, k, v = (block.linear(n).input_scale for n in ("q", "k", "v"))
        assert q is not None and torch.equal(q, k) and torch.equal(q, v)
        assert torch.equal(block.linear("gate").input_scale, block.linear("up").input_scale)


def test_per_token_act_aware_leaves_row_parallel_linears_to_plain_gptq(tiny_models, calib_file):
    """o/down inputs are quantized per rank's slice under tensor parallelism: their rounding is
    unknown at quantization time, so act-aware GPTQ must not fit them to the full-row one."""
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize
    from sqdeploy.quantize.recipes import parse_recipe

    def run(aware):
        rec = parse_recipe({"name": f"pt{int(aware)}", "scheme": {"weight": {"bits": 8, "granularity": "channel"},
                                                                  "act": {"kind": "dynamic_token"}},
                            "algorithm": {"name": "smoothquant", "alpha": 0.8, "rounding": "gptq", "gptq_act_aware": aware},
                            "smoothing_groups": "norms"})
        kept = {}
        quantize(tiny_models["llama"], rec, Calibration(str(calib_file), 8, 64), Runtime(progress=False),
                 lambda r: kept.update({(r.index, n): q.q.clone() for n, q in r.result.qweights.items()}))
        return kept

    plain, aware = run(False), run(True)
    same = {k: float((plain[k] == aware[k]).float().mean()) for k in plain}
    assert all(v > 0.98 for (_, n), v in same.items() if n in ("o", "down")), same
    assert all(v < 0.98 for (_, n), v in same.items() if n in ("q", "k", "v", "gate", "up")), same


def test_act_order_with_a_diagonal_hessian_rounds_to_nearest_in_place():
    """No correlations, no error to feed forward: any column order must give round-to-nearest,
    each integer back in its own column, group scales from the unrounded weights."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(6)) + 0.1)
    for scheme in (W8, WeightScheme(4, "group", 32, True), WeightScheme(4, "group", 32, False)):
        want = qmath.quantize_weight(w, scheme)
        got = gptq_quantize(w, h, scheme, damp=0.0, act_order=True)
        assert torch.equal(got.q, want.q)
        torch.testing.assert_close(got.scale, want.scale)
        assert (got.zero is None) == (want.zero is None) and (got.zero is None or torch.equal(got.zero, want.zero))


def test_act_order_lowers_int4_error_when_the_active_channels_come_last():
    """The active channels are rounded first, while the most columns remain to absorb their error."""
    calib, held = _inputs(4000, 128, 7).flip(1), _inputs(4000, 128, 8).flip(1)  # outlier channels last
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(9))
    scheme = WeightScheme(4, "group", 32, True)
    h = 2 * calib.t() @ calib / len(calib)

    def error(qw):
        return float((held @ (w - qmath.dequantize_weight(qw, scheme)).t()).norm())

    ordered = gptq_quantize(w, h, scheme, act_order=True)
    assert error(ordered) < 0.9 * error(gptq_quantize(w, h, scheme))
    assert torch.equal(ordered.scale, qmath.weight_qparams(w, scheme)[0])  # static groups: contiguous, as stored


def test_release_sums_drops_only_the_sums_nothing_else_holds():
    """After the final smoothing GPTQ needs only the scaled sums: the unsmoothed ones go, a sum the
    smoothed statistics still share (an unsmoothed linear) stays."""
    from sqdeploy.quantize.streaming import ChannelStats, LayerData

    def st(xtx=True):
        return ChannelStats(torch.ones(4), torch.ones(4), 10, torch.eye(4, dtype=torch.float64) if xtx else None)

    stats = {"q": st(), "o": st(), "down": st(False)}
    smoothed = {"q": stats["q"].scaled(torch.full((4,), 2.0)), "o": stats["o"], "down": stats["down"]}
    data = LayerData(0, [], [], stats, torch.zeros(2), None, torch.device("cpu"))
    data.release_sums(smoothed)
    assert data.stats["q"].xtx is None and smoothed["q"].xtx is not None
    assert data.stats["o"].xtx is smoothed["o"].xtx is not None
    torch.testing.assert_close(data.stats["q"].absmax, torch.ones(4))  # only the sums change


def _textbook_gptq(w, h, scheme, damp, clip, act_order):
    """GPTQ as the paper writes it, one column at a time in one loop (no block loops, no graphs):
    the integers ``gptq_quantize`` must reproduce bit for bit."""
    w = w.float().clone()
    out_f, in_f = w.shape
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_f)
    group = scheme.group_size if scheme.granularity == "group" else None
    col = WeightScheme(scheme.bits, "channel", None, scheme.symmetric)
    static = group is None or act_order
    n_groups = qmath.num_groups(scheme, in_f)
    scales = torch.empty(out_f if scheme.granularity != "tensor" else 1, n_groups)
    zeros = None if scheme.symmetric else torch.empty_like(scales)
    if static:
        s, z = qmath.weight_qparams(w, scheme, clip)
        scales[:], s_rows = s, s.expand(out_f, n_groups)
        if z is not None:
            zeros[:] = z
        z_rows = None if z is None else z.expand(out_f, n_groups)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_cols = torch.empty(out_f, in_f, dtype=torch.int8)
    for b0 in range(0, in_f, 128):
        b1 = min(b0 + 128, in_f)
        w1, err1, hinv1 = w[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0), hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            c = b0 + j
            if static:
                g = int(perm[c]) // group if group else 0
                cur_s, cur_z = s_rows[:, g], None if z_rows is None else z_rows[:, g]
            elif c % group == 0:
                g = c // group
                s, z = qmath.weight_qparams(w1[:, j : j + group], col, None if clip is None else clip[:, g : g + 1])
                scales[:, g], cur_s, cur_z = s[:, 0], s[:, 0], None
                if z is not None:
                    zeros[:, g], cur_z = z[:, 0], z[:, 0]
            x = w1[:, j]
            q = (torch.round(x / cur_s) + (0 if cur_z is None else cur_z)).clamp(scheme.qmin, scheme.qmax)
            q_cols[:, c] = q.to(torch.int8)
            e = (x - (q - (0 if cur_z is None else cur_z)) * cur_s) / hinv1[j, j]
            w1[:, j:] -= e[:, None] * hinv1[j, j:][None, :]
            err1[:, j] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    q_all = torch.empty_like(q_cols)
    q_all[:, perm] = q_cols
    return q_all, scales, zeros


def test_gptq_equals_the_textbook_loop_bit_for_bit():
    """The block loops (replayed from CUDA graphs on a GPU) compute exactly the paper's column loop."""
    schemes = [WeightScheme(4, "group", 128, False), WeightScheme(4, "group", 32, True), WeightScheme(4, "group", 256, False),
               W8, WeightScheme(8, "tensor", None, True)]
    for i, scheme in enumerate(schemes):
        for act_order in (False, True):
            in_f = 512 if scheme.group_size == 256 else 320 if scheme.group_size in (None, 32) else 384
            x = _inputs(700, in_f, i)
            h = 2 * x.t() @ x / len(x)
            w = torch.randn(24, in_f, generator=torch.Generator().manual_seed(i))
            clip = None
            if scheme.granularity == "group":
                clip = 0.7 + 0.3 * torch.rand(24, in_f // scheme.group_size, generator=torch.Generator().manual_seed(7))
            got = gptq_quantize(w, h, scheme, 0.01, clip, act_order)
            q, s, z = _textbook_gptq(w, h, scheme, 0.01, clip, act_order)
            assert torch.equal(got.q, q), (scheme, act_order)
            assert torch.equal(got.scale, s), (scheme, act_order)
            assert (z is None and got.zero is None) or torch.equal(got.zero, z.to(torch.int8)), (scheme, act_order)
