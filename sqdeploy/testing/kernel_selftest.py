"""GPU self-checks of every kernel against :mod:`.reference` (run by the GPU benchmark before it times anything).

Fresh random inputs per case, outputs poisoned beforehand (the caching allocator
tends to hand back the block just freed, so it is filled with NaN first), and
tolerances that follow from the arithmetic:

* INT8 GEMM: the INT32 dot products are exact; only the FP16 output rounds
  (relative ``2^-11`` per element), so the norm-wise error must stay under 1e-3.
* INT4 GEMM: weights enter the tensor cores as FP16 ``(q - z) * s`` with FP16 scales
  (two FP16 roundings per weight) and the output rounds once: under 2e-3.
* fused norm / activation / quantization kernels: the same rounding points as the
  reference; INT8 outputs may differ by one step where an FP16 intermediate differs
  in its last bit (transcendentals, reduction order): at most 1e-3 of the elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sqdeploy.kernels import ops
from sqdeploy.kernels import reference as ref
from sqdeploy.kernels import triton_fused as tf
from sqdeploy.kernels import triton_gemm as tg
from sqdeploy.kernels import triton_int8_gemv
from sqdeploy.kernels.packing import Int4Weight, Int8Weight, dequantize_int4, pack_int4
from sqdeploy.kernels.reference import InputQuant
from sqdeploy.kernels.tuning import Tuner


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _poison(shape, dtype) -> None:
    t = torch.empty(shape, dtype=dtype, device="cuda")
    if dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-77)
    del t


def _row(check: str, case: str, value: float, limit: float) -> dict:
    return {"check": check, "case": case, "value": value, "limit": limit, "ok": bool(value <= limit)}


def _int8_case(m, n, k, per_token=True):
    qx = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    sx = torch.rand(m if per_token else 1, device="cuda") * 0.05 + 1e-3
    w = Int8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda"), torch.rand(n, device="cuda") * 1e-3 + 1e-5)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    return ref.QAct(qx, sx), w, bias


def check_int8(rows: list, shapes=((1, 1536, 4096), (5, 1536, 4096), (16, 3072, 4096), (64, 1536, 11008),
                                   (300, 2048, 4096), (2048, 4096, 4096))) -> None:
    for m, n, k in shapes:
        for per_token in (True, False):
            qa, w, bias = _int8_case(m, n, k, per_token)
            expect = ref.int8_linear(qa, w, bias, torch.float32)
            _poison((m, n), torch.float16)
            out = ops.int8_linear(qa, w, bias, torch.float16)
            rows.append(_row("int8_gemm", f"M={m} N={n} K={k} {'token' if per_token else 'tensor'}", _rel(out, expect), 1e-3))


def _int4_case(n, k, g, asym):
    q = torch.randint(0, 16, (n, k), dtype=torch.int8, device="cuda")
    scales = (torch.rand(k // g, n, device="cuda") * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 16, (k // g, n), device="cuda").half() if asym else None
    return Int4Weight(pack_int4(q), scales, zeros, g, n, k)


def check_int4(rows: list, ms=(1, 4, 16, 64, 300, 1024), n=1536, k=4096) -> None:
    for g, asym in ((128, True), (64, False), (32, True)):
        w = _int4_case(n, k, g, asym)
        dense = dequantize_int4(w, torch.float32)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            expect = F.linear(x.float(), dense, bias.float())
            _poison((m, n), torch.float16)
            out = ops.int4_linear(x, w, bias)
            rows.append(_row("int4_gemm", f"M={m} N={n} K={k} g={g} {'asym' if asym else 'sym'}", _rel(out, expect), 2e-3))


def check_splitk(rows: list) -> bool:
    """Every split-K candidate against the reference, and three runs bit for bit (a race shows as a
    difference). A wrong or racing result distrusts the reduction itself (False: split-K goes off for
    every kernel); a configuration that does not compile says nothing about it and is only disabled."""
    ok = True
    for tuner, cands, run in _splitk_cases():
        for cfg in cands:
            if cfg["SPLIT_K"] == 1:
                continue
            tuner.forced = cfg
            try:
                outs, expect = run()
                same = all(torch.equal(outs[0], o) for o in outs[1:])
                err = _rel(outs[0], expect) if same else float("inf")
            except Exception as e:  # noqa: BLE001 - e.g. a CompilationError of this one tile
                rows.append(_row(f"splitk_{tuner.name}", f"{cfg} raised {type(e).__name__}", float("inf"), 2e-3))
                Tuner.disable(tuner.name, cfg)
                continue
            finally:
                tuner.forced = None
            limit = 2e-3
            rows.append(_row(f"splitk_{tuner.name}", f"{cfg}", err, limit))
            ok &= err <= limit
    return ok


def _splitk_cases():
    qa, w8, bias = _int8_case(8, 1536, 4096)
    w4 = _int4_case(1536, 4096, 128, True)
    dense = dequantize_int4(w4, torch.float32)
    x1 = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    x8 = torch.randn(8, 4096, device="cuda", dtype=torch.float16)

    def run8():
        return [tg.int8_gemm(qa.q, qa.scale, w8.q, w8.scale, bias, torch.float16) for _ in range(3)], \
            ref.int8_linear(qa, w8, bias, torch.float32)

    def run4(x):
        return lambda: ([tg.int4_gemm(x, w4.packed, w4.scales, w4.zeros, 128, None) for _ in range(3)],
                        F.linear(x.float(), dense))

    return [
        (tg._INT8, tg._usable(tg._int8_candidates(8), 4096, max_split=32), run8),
        (tg._INT4_GEMV, tg._usable(tg._int4_candidates(1), 4096, 128), run4(x1)),
        (tg._INT4, tg.int4_gemm_candidates(8, 4096, 128, True, dequant=False), run4(x8)),
    ]


def check_candidates(rows: list) -> None:
    """Every one-row INT4 GEMV configuration (with and without the fused activation), every one-row
    INT8 GEMV and every TMA-fed INT8 configuration (large- and mid-M tiles) against the reference; a
    configuration that fails is disabled for the rest of the process, so the tuner can never pick it."""
    w4 = _int4_case(1536, 4096, 128, True)
    dense = dequantize_int4(w4, torch.float32)
    x1 = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    gu = torch.randn(1, 8192, device="cuda", dtype=torch.float16) * 2
    gated = F.linear(tf.act_mul(gu, "silu", True, InputQuant()).float(), dense)
    cases = [(tg._INT4_GEMV, cfg, lambda: tg.int4_gemm(x1, w4.packed, w4.scales, w4.zeros, 128, None),
              lambda: F.linear(x1.float(), dense), (1, 1536))
             for cfg in tg.one_row_candidates(4096, 128, True, False) if cfg.get("KIND") != "gemlite"]
    cases += [(tg._INT4_GEMV, cfg, lambda: tg.int4_gemm(gu, w4.packed, w4.scales, w4.zeros, 128, None, act="silu"),
               lambda: gated, (1, 1536)) for cfg in tg.gemv_candidates(4096, 128)]
    cases += _int8_cases(300, "tma") + _int8_cases(200, "tma")  # the large-M and the mid-M (65..256 rows) TMA tiles
    gemv8 = triton_int8_gemv.KIND
    cases += _int8_cases(1, gemv8) + _int8_cases(1, gemv8, 1000, 11008)  # dp4a GEMVs: split K, a ragged last tile
    for tuner, cfg, run, want, shape in cases:
        tuner.forced = cfg
        try:
            _poison(shape, torch.float16)
            first = run()
            err = _rel(first, want()) if torch.equal(first, run()) else float("inf")  # a race shows as a difference
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is disabled too
            err = float("inf")
            print(f"   {tuner.name} {cfg}: {type(e).__name__}: {e}"[:400], flush=True)
        finally:
            tuner.forced = None
        limit = 1e-3 if tuner is tg._INT8 else 2e-3
        rows.append(_row(f"candidate_{tuner.name}", _brief(cfg), err, limit))
        if not err <= limit:
            Tuner.disable(tuner.name, cfg)


def check_int4_gemm_candidates(rows: list) -> None:
    """Every INT4 GEMM configuration the tuner may time for 2+ rows (plain and plane-wise tensor-core
    kernels, dequantize-then-cuBLAS), per bucket of rows, for a group that spans a tile and groups
    smaller than one, against the reference and twice bit for bit; a failing one is disabled."""
    for m in (8, 24, 40, 200):
        for g, asym in ((128, True), (32, False)):
            w = _int4_case(1536, 4096, g, asym)
            dense = dequantize_int4(w, torch.float32)
            x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
            bias = torch.randn(1536, device="cuda", dtype=torch.float16)
            want = F.linear(x.float(), dense, bias.float())
            for cfg in tg.int4_gemm_candidates(m, 4096, g, asym):
                if cfg.get("KIND") == "gemlite":
                    continue  # check_gemlite's
                tg._INT4.forced = cfg
                try:
                    _poison((m, 1536), torch.float16)
                    first = tg.int4_gemm(x, w.packed, w.scales, w.zeros, g, bias)
                    again = tg.int4_gemm(x, w.packed, w.scales, w.zeros, g, bias)
                    err = _rel(first, want) if torch.equal(first, again) else float("inf")
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is disabled too
                    err = float("inf")
                    print(f"   int4_gemm {cfg}: {type(e).__name__}: {e}"[:400], flush=True)
                finally:
                    tg._INT4.forced = None
                rows.append(_row("candidate_int4_gemm", f"M={m} g={g} " + _brief(cfg), err, 2e-3))
                if not err <= 2e-3:
                    Tuner.disable("int4_gemm", cfg)


def check_gemlite(rows: list) -> None:
    """Every gemlite kernel type the tuner may offer (:mod:`.gemlite_int4`), for asymmetric and symmetric
    weights separately, several row counts, against the reference and three runs bit for bit; a
    type that fails is disabled for that kind of weight."""
    from sqdeploy.kernels import gemlite_int4 as gl

    if not gl.available():
        return
    for bucket, ms in ((1, (1,)), (16, (2, 16)), (64, (17, 64)), (256, (100, 128))):
        for asym, groups in ((True, (128,)), (False, (64, 128))):
            for cfg in gl.candidates(bucket, 128, asym):
                tuner = tg._INT4_GEMV if bucket == 1 else tg._INT4
                worst = 0.0
                for g in groups:
                    w = _int4_case(1536, 4096, g, asym)
                    dense = dequantize_int4(w, torch.float32)
                    for m in ms:
                        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
                        bias = torch.randn(1536, device="cuda", dtype=torch.float16)
                        tuner.forced = cfg
                        try:
                            _poison((m, 1536), torch.float16)
                            outs = [tg.int4_gemm(x, w.packed, w.scales, w.zeros, g, bias) for _ in range(3)]
                            same = all(torch.equal(outs[0], o) for o in outs[1:])
                            err = _rel(outs[0], F.linear(x.float(), dense, bias.float())) if same else float("inf")
                        except Exception as e:  # noqa: BLE001 - a type that does not run is disabled too
                            err = float("inf")
                            print(f"   gemlite {cfg}: {type(e).__name__}: {e}"[:400], flush=True)
                        finally:
                            tuner.forced = None
                        rows.append(_row(f"gemlite_{cfg['TYPE']}", f"M={m} g={g} {cfg['ZERO']}", err, 2e-3))
                        worst = max(worst, err)
                if not worst <= 2e-3:
                    for name in ("int4_gemv", "int4_gemm"):
                        Tuner.disable(name, cfg)


def _int8_cases(m: int, kind: str, n: int = 1536, k: int = 4096) -> list:
    """(tuner, config, run, reference, output shape) for every INT8 configuration offered at ``m`` rows whose
    kind starts with ``kind`` (``tma``: the TMA-fed tiles; the one-row ``dp4a`` GEMV's)."""
    qa, w8, bias = _int8_case(m, n, k)
    expect8 = ref.int8_linear(qa, w8, bias, torch.float32)
    return [(tg._INT8, cfg, lambda: tg.int8_gemm(qa.q, qa.scale, w8.q, w8.scale, bias, torch.float16),
             lambda: expect8, (m, n)) for cfg in tg.int8_candidates(m, k, qa.q.device)
            if cfg.get("KIND", "").startswith(kind)]


def _brief(cfg: dict) -> str:
    keys = ("KIND", "TYPE", "BLOCK_M", "BLOCK_N", "BLOCK_K", "K_PER", "MATH", "STAGES", "GROUP_M", "num_warps", "num_stages")
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def _q_mismatch(a: ref.QAct, b: ref.QAct) -> float:
    d = (a.q.int() - b.q.int()).abs()
    if int(d.max()) > 1 or not torch.allclose(a.scale.float(), b.scale.float(), rtol=1e-3, atol=0):
        return 1.0
    return float((d > 0).float().mean())


def check_fused(rows: list, m: int = 64, hidden: int = 4096, inter: int = 11008) -> None:
    from sqdeploy.model.layers import Norm

    class _Cfg:
        norm, norm_eps, hidden_size, norm_has_bias = "rms", 1e-5, hidden, False

    norm = Norm(_Cfg()).cuda().half()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(m, hidden, device="cuda", dtype=torch.float16) * 2
    d = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
    for iq in (InputQuant(), InputQuant("static", torch.tensor([0.03], device="cuda")), InputQuant("token")):
        h1, y1 = tf.add_norm(x, d, norm, iq)
        h2, y2 = ref.add_norm(x, d, norm, iq)
        rows.append(_row("add_norm_residual", iq.kind, _rel(h1, h2), 0.0))
        v = _q_mismatch(y1, y2) if iq.active else _rel(y1, y2)
        rows.append(_row("add_norm", iq.kind, v, 1e-3))
    h = torch.randn(m, 2 * inter, device="cuda", dtype=torch.float16) * 2
    for iq in (InputQuant(), InputQuant("static", torch.tensor([0.02], device="cuda")), InputQuant("token")):
        a, b = tf.act_mul(h, "silu", True, iq), ref.act_mul(h, "silu", True, iq)
        rows.append(_row("act_mul_silu", iq.kind, _q_mismatch(a, b) if iq.active else _rel(a, b), 1e-3))
    token = InputQuant("token")
    want = ref.act_mul(h, "silu", True, token)
    for form in tf.token_row_forms(inter):  # every launch form the tuner may pick for per-token rows
        tf._TOKEN_ROWS.forced = form
        try:
            err = _q_mismatch(tf.act_mul(h, "silu", True, token), want)
        finally:
            tf._TOKEN_ROWS.forced = None
        rows.append(_row("act_mul_token_form", str(form), err, 1e-3))
        if not err <= 1e-3:
            Tuner.disable("act_mul_token", form)
    for iq in (InputQuant("token"), InputQuant("tensor")):
        rows.append(_row("quantize", iq.kind, _q_mismatch(tf.quantize(x, iq), ref.quantize(x, iq)), 1e-4))
    _check_rope(rows)


def _check_rope(rows: list) -> None:
    b, t, h, hkv, dim, tmax = 2, 5, 8, 2, 128, 32
    qkv = torch.randn(b, t, (h + 2 * hkv) * dim, device="cuda", dtype=torch.float16)
    start = torch.tensor([7], device="cuda")
    pos = (start + torch.arange(t, device="cuda")).float()[None].expand(b, t)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    caches = [torch.zeros(b, hkv, tmax, dim, device="cuda", dtype=torch.float16) for _ in range(4)]
    q1 = tf.rope_cache(qkv, emb.cos(), emb.sin(), caches[0], caches[1], start, h, hkv, dim)
    q2 = ref.rope_cache(qkv, emb.cos(), emb.sin(), caches[2], caches[3], start, h, hkv, dim)
    err = max(_rel(q1, q2), _rel(caches[0], caches[2]), _rel(caches[1], caches[3]))
    rows.append(_row("rope_cache", f"B={b} T={t} H={h} Hkv={hkv} D={dim}", err, 1e-3))


def check_gated_gemv(rows: list) -> bool:
    """Decode's act*mul fused into the down GEMV against the two separate kernels."""
    ok = True
    for asym in (True, False):
        w = _int4_case(1536, 4096, 128, asym)
        gu = torch.randn(1, 2 * 4096, device="cuda", dtype=torch.float16) * 2
        expect = tg.int4_gemm(tf.act_mul(gu, "silu", True, InputQuant()), w.packed, w.scales, w.zeros, 128, None)
        _poison((1, 1536), torch.float16)
        got = tg.int4_gemm(gu, w.packed, w.scales, w.zeros, 128, None, act="silu")
        err = _rel(got, expect)
        rows.append(_row("int4_gemv_act_fused", f"N=1536 K=4096 {'asym' if asym else 'sym'}", err, 1e-3))
        ok &= err <= 1e-3
    return ok


def check_decode_attention(rows: list) -> bool:
    """The flash-decoding kernel against SDPA over the valid prefix (MHA and GQA, several lengths)."""
    from sqdeploy.kernels import triton_attention

    ok = True
    for b, h, hkv, d, tmax, length, win in ((1, 32, 32, 128, 264, 200, None), (8, 32, 32, 128, 264, 130, None),
                                           (2, 64, 8, 128, 600, 577, None), (2, 8, 2, 64, 256, 256, 64)):
        q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, hkv, tmax, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, hkv, tmax, d, device="cuda", dtype=torch.float16)
        rep = h // hkv
        kk, vv = k.repeat_interleave(rep, 1)[:, :, :length].float(), v.repeat_interleave(rep, 1)[:, :, :length].float()
        mask = None
        if win:
            mask = ((length - 1 - torch.arange(length, device="cuda")) < win)[None, None, None, :]
        expect = F.scaled_dot_product_attention(q.float()[:, :, None], kk, vv, attn_mask=mask)[:, :, 0]
        _poison((b, h, d), torch.float16)
        got = triton_attention.decode_attention(q, k, v, torch.tensor([length], device="cuda"), win)
        err = _rel(got, expect)
        rows.append(_row("decode_attention", f"B={b} H={h} Hkv={hkv} D={d} len={length}/{tmax} win={win}", err, 2e-3))
        ok &= err <= 2e-3
    return ok


def run_all() -> tuple[list[dict], bool]:
    """All checks; returns the rows and whether the split-K reduction can be trusted. A fused path that
    fails its check (split-K, act*mul in the GEMV, decode attention) is switched off for the rest of the run."""
    rows: list[dict] = []
    splitk_ok = _guarded(rows, "splitk", check_splitk) is True
    if not splitk_ok:
        tg.SPLITK_ENABLED = False
    for name, fn in (("candidates", check_candidates), ("int4_gemm_candidates", check_int4_gemm_candidates),
                     ("gemlite", check_gemlite), ("int8_gemm", check_int8),
                     ("int4_gemm", check_int4), ("fused", check_fused)):
        _guarded(rows, name, fn)
    if _guarded(rows, "int4_gemv_act_fused", check_gated_gemv) is not True:
        ops.FUSE_ACT_INTO_GEMV = False  # the model falls back to the separate kernels
    if _guarded(rows, "decode_attention", check_decode_attention) is not True:
        ops.DECODE_ATTENTION = False  # the model falls back to SDPA
    return rows, splitk_ok


def _guarded(rows: list, name: str, fn):
    """A check that raises (a kernel that does not compile, say) becomes a failed row, not a lost run."""
    try:
        return fn(rows)
    except Exception as e:  # noqa: BLE001
        rows.append({"check": name, "case": f"raised {type(e).__name__}: {e}"[:400], "value": float("inf"),
                     "limit": 0.0, "ok": False})
        return None
