"""The Triton kernels' own code, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

Indexing, packing, masking, the split-K reduction and the rounding points of every kernel
are checked here against :mod:`sqdeploy.kernels.reference`; what the interpreter cannot
show (speed, memory ordering between thread blocks) the GPU benchmark's self-checks cover.
Needs the ``triton`` package (``pip install -e .[gpu]``).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package: pip install -e .[gpu]")
if os.environ["TRITON_INTERPRET"] != "1":  # pragma: no cover
    pytest.skip("Triton kernels are interpreted here only with TRITON_INTERPRET=1", allow_module_level=True)

import triton.runtime.interpreter as _interp  # noqa: E402

from sqdeploy.kernels import ops  # noqa: E402
from sqdeploy.kernels import reference as ref
from sqdeploy.kernels import triton_attention as ta  # noqa: E402
from sqdeploy.kernels import triton_fused as tf
from sqdeploy.kernels import triton_gemm as tg
from sqdeploy.kernels.packing import Int4Weight, Int8Weight, dequantize_int4, pack_int4  # noqa: E402
from sqdeploy.kernels.reference import InputQuant  # noqa: E402

_orig_patch = _interp._patch_lang_tensor


def _patch(tensor, scope):  # numpy >= 2.4 refuses int() of a one-element array, which the interpreter relies on
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_interp._patch_lang_tensor = _patch
GEN = torch.Generator().manual_seed(0)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("m,n,k", [(1, 48, 1024), (5, 40, 2048), (33, 72, 512), (200, 72, 384), (300, 72, 384)])
def test_int8_gemm_every_candidate(m, n, k):
    qx = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=GEN)
    w = Int8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=GEN), torch.rand(n, generator=GEN) + 0.1)
    sx, bias = torch.rand(m, generator=GEN) + 0.1, torch.randn(n, generator=GEN)
    expect = ref.int8_linear(ref.QAct(qx, sx), w, bias, torch.float32)
    try:
        for cfg in tg.int8_candidates(m, k, torch.device("cpu")):  # pointer tiles and (m > 64) TMA-fed ones
            tg._INT8.forced = cfg
            assert _rel(tg.int8_gemm(qx, sx, w.q, w.scale, bias, torch.float32), expect) < 1e-6, cfg
    finally:
        tg._INT8.forced = None


def test_int8_gemv_split_and_ragged_columns_equal_the_gemm():
    """The one-row dp4a GEMV (plain-Triton form here): K split over programs, a ragged last column tile,
    per-tensor scale; unsplit it equals the tensor-core tile bit for bit (integer sums are exact)."""
    m, n, k = 1, 40, 4096
    qx = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=GEN)
    w = Int8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=GEN), torch.rand(n, generator=GEN) + 0.1)
    sx, bias = torch.rand(1, generator=GEN) + 0.1, torch.randn(n, generator=GEN)
    expect = ref.int8_linear(ref.QAct(qx, sx), w, bias, torch.float32)
    gemv = [c for c in tg.int8_candidates(m, k, torch.device("cpu")) if c.get("KIND") == tg.triton_int8_gemv.KIND]
    assert {c["SPLIT_K"] for c in gemv} >= {1, 2}, gemv
    try:
        tg._INT8.forced = tg.int8_candidates(m, k, torch.device("cpu"))[0]
        tile = tg.int8_gemm(qx, sx, w.q, w.scale, bias, torch.float32)
        for cfg in gemv:
            tg._INT8.forced = cfg
            y = tg.int8_gemm(qx, sx, w.q, w.scale, bias, torch.float32)
            assert _rel(y, expect) < 1e-6, cfg
            if cfg["SPLIT_K"] == 1:
                assert torch.equal(y, tile), cfg
        tg._INT8.forced = gemv[0]
        odd = torch.zeros(m, k + 1, dtype=torch.int8)[:, 1:]  # not word-aligned: falls back to a tile
        odd.copy_(qx)
        assert _rel(tg.int8_gemm(odd, sx, w.q, w.scale, bias, torch.float32), expect) < 1e-6
    finally:
        tg._INT8.forced = None


def _int4_problem(m: int, n: int, k: int, group: int, asym: bool):
    """Random packed INT4 weights (uint8 zero points, float32 scales as on the CPU), input, bias, reference output."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int8, generator=GEN)
    zeros = torch.randint(0, 16, (k // group, n), dtype=torch.uint8, generator=GEN) if asym else None
    w = Int4Weight(pack_int4(q), torch.rand(k // group, n, generator=GEN) * 0.1 + 0.01, zeros, group, n, k)
    x, bias = torch.randn(m, k, generator=GEN), torch.randn(n, generator=GEN)
    return w, x, bias, torch.nn.functional.linear(x, dequantize_int4(w), bias)


@pytest.mark.parametrize("m,k,group,asym", [(1, 1024, 128, True), (1, 1408, 64, False), (3, 1024, 128, True),
                                           (20, 1024, 64, False)])
def test_int4_gemm_every_candidate(m, k, group, asym):
    """One row: the narrow and the wide GEMVs (K = 1408 leaves a masked tail slice); more rows: the GEMM."""
    w, x, bias, expect = _int4_problem(m, 40, k, group, asym)
    tuner = tg._INT4_GEMV if m == 1 else tg._INT4
    try:
        cands = tg.gemv_candidates(k, group) if m == 1 else tg._usable(tg._int4_candidates(m), k, group, max_split=32)
        for cfg in cands:
            tuner.forced = cfg
            assert _rel(tg.int4_gemm(x, w.packed, w.scales, w.zeros, group, bias), expect) < 1e-6, cfg
    finally:
        tuner.forced = None
    assert torch.equal(tg.int4_dequantize(w.packed, w.scales, w.zeros, group, torch.float32).t(), dequantize_int4(w))


@pytest.mark.parametrize("m,k,group,asym", [(3, 1024, 128, True), (20, 768, 32, False), (50, 1024, 64, True),
                                           (40, 1152, 128, False)])
def test_int4_planes_every_candidate(m, k, group, asym):
    """The plane-wise tensor-core kernel: groups spanning a tile, several groups per tile, split K, tails of M and N."""
    from sqdeploy.kernels import triton_int4_planes as tp

    w, x, bias, expect = _int4_problem(m, 40, k, group, asym)
    offered = [c for c in tg.int4_gemm_candidates(m, k, group, asym) if c.get("KIND") == tp.KIND]
    assert offered and all(c["MATH"] == 0 for c in offered)  # the PTX unpacking is GPU-only
    tiles = [tp.planes_cfg(16, 64, 128, 256, 4, 4, 0), tp.planes_cfg(32, 64, 128, 512, 4, 4, 0),
             tp.planes_cfg(64, 64, 256, 512, 4, 3, 0)]
    cands = offered + [c for c in (tp.resolve(t, k, True) for t in tiles) if c is not None]
    assert any(c["SPLIT_K"] > 1 for c in cands)
    assert k % 1024 == 0 or any(k % c["K_PER"] for c in cands)  # K = 1152: a shorter last slice
    try:
        for cfg in cands:
            tg._INT4.forced = cfg
            assert _rel(tg.int4_gemm(x, w.packed, w.scales, w.zeros, group, bias), expect) < 1e-6, cfg
    finally:
        tg._INT4.forced = None


def test_int4_gemv_with_fused_activation():
    n, k = 40, 512
    w = Int4Weight(pack_int4(torch.randint(0, 16, (n, k), dtype=torch.int8, generator=GEN)),
                   torch.rand(k // 64, n, generator=GEN) * 0.1, None, 64, n, k)
    gu = torch.randn(1, 2 * k, generator=GEN)
    expect = ref.int4_linear(ref.act_mul(gu, "silu", True, InputQuant()), w, None)
    try:
        for cfg in tg.gemv_candidates(k, 64)[:: 4]:
            tg._INT4_GEMV.forced = cfg
            assert _rel(tg.int4_gemm(gu, w.packed, w.scales, None, 64, None, act="silu"), expect) < 1e-6, cfg
    finally:
        tg._INT4_GEMV.forced = None


@pytest.mark.parametrize("iq", [InputQuant(), InputQuant("static", torch.tensor([0.03])), InputQuant("token")],
                         ids=["none", "static", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_norm_and_activation_kernels(iq, dtype):
    from sqdeploy.model.layers import Norm

    class Cfg:
        norm, norm_eps, hidden_size, norm_has_bias = "rms", 1e-5, 96, False

    norm = Norm(Cfg()).to(dtype)
    x, d = (torch.randn(7, 96, generator=GEN) * 3).to(dtype), torch.randn(7, 96, generator=GEN).to(dtype)
    h = (torch.randn(3, 2 * 2500, generator=GEN) * 2).to(dtype)
    whole_row = tf.act_mul(h, "silu", True, iq)
    forms = []
    if iq.kind == "token":  # every launch form the tuner may choose (whole row, two pieces, two passes)
        assert {f["ROW_PASSES"] for f in tf.token_row_forms(2500)} == {1, 2, 3}
        for form in tf.token_row_forms(2500):
            tf._TOKEN_ROWS.forced = form
            try:
                forms.append(((None, tf.act_mul(h, "silu", True, iq)), (None, ref.act_mul(h, "silu", True, iq))))
            finally:
                tf._TOKEN_ROWS.forced = None
    for got, want in ((tf.add_norm(x, d, norm, iq), ref.add_norm(x, d, norm, iq)),
                      ((None, whole_row), (None, ref.act_mul(h, "silu", True, iq))), *forms):
        if got[0] is not None:
            assert torch.equal(got[0], want[0])
        if iq.active:
            assert torch.equal(got[1].q, want[1].q) and torch.allclose(got[1].scale, want[1].scale)
        else:
            assert _rel(got[1], want[1]) < 1e-5


def test_rope_and_decode_attention():
    qkv = torch.randn(2, 3, 8 * 16, generator=GEN)
    ang = torch.rand(2, 3, 16, generator=GEN)
    for a, b in zip(tf.rope_qkv(qkv, ang.cos(), ang.sin(), 4, 2, 16), ref.rope_qkv(qkv, ang.cos(), ang.sin(), 4, 2, 16)):
        assert torch.equal(a, b)
    q, k, v = torch.randn(2, 4, 32, generator=GEN), torch.randn(2, 2, 150, 32, generator=GEN), torch.randn(2, 2, 150, 32, generator=GEN)
    got = ta.decode_attention(q, k, v, torch.tensor([77]), None)
    kk, vv = k.repeat_interleave(2, 1)[:, :, :77], v.repeat_interleave(2, 1)[:, :, :77]
    assert _rel(got, torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv)[:, :, 0]) < 1e-5


def test_whole_model_through_the_triton_kernels(tiny_models, calib_file, tmp_path):
    """A W8A8 per-token model: every linear, norm, rope, decode-attention and split-K kernel in one run."""
    from sqdeploy.kernels import greedy_generate, prepare_model
    from sqdeploy.model.loading import load_model
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
    from sqdeploy.quantize.qmodel import QuantizedModel
    from sqdeploy.quantize.recipes import parse_recipe

    recipe = parse_recipe({"name": "t", "scheme": {"weight": {"bits": 8, "granularity": "channel"},
                                                   "act": {"kind": "dynamic_token"}}, "algorithm": "rtn"})
    quantize_to_dir(tiny_models["llama"], recipe, tmp_path / "q", Calibration(str(calib_file), 2, 32), Runtime(progress=False))
    qm = QuantizedModel(tmp_path / "q")
    model = load_model(qm)
    plain = prepare_model(model, "cpu", qm)
    ops.FORCE_TRITON = True
    try:
        kern = prepare_model(model, "cpu", qm)
        ids = torch.randint(0, 8000, (2, 9), generator=GEN)
        with torch.no_grad():
            got = kern(ids)
        tokens = greedy_generate(kern, [ids[0, :5].tolist()], 4)
    finally:
        ops.FORCE_TRITON = False
    with torch.no_grad():
        assert _rel(got, plain(ids)) < 5e-3
    assert tokens == greedy_generate(plain, [ids[0, :5].tolist()], 4)


def test_decode_attention_with_one_length_per_row():
    q, k, v = torch.randn(3, 4, 32, generator=GEN), torch.randn(3, 2, 150, 32, generator=GEN), torch.randn(3, 2, 150, 32, generator=GEN)
    lengths = torch.tensor([77, 1, 150])
    got = ta.decode_attention(q, k, v, lengths, None)
    for b, n in enumerate(lengths.tolist()):
        kk, vv = k[b : b + 1].repeat_interleave(2, 1)[:, :, :n], v[b : b + 1].repeat_interleave(2, 1)[:, :, :n]
        want = torch.nn.functional.scaled_dot_product_attention(q[b : b + 1, :, None], kk, vv)[:, :, 0]
        assert _rel(got[b : b + 1], want) < 1e-5
    windowed = ta.decode_attention(q, k, v, lengths, 10)
    kk, vv = k[:1].repeat_interleave(2, 1)[:, :, 67:77], v[:1].repeat_interleave(2, 1)[:, :, 67:77]
    assert _rel(windowed[:1], torch.nn.functional.scaled_dot_product_attention(q[:1, :, None], kk, vv)[:, :, 0]) < 1e-5


def test_slot_cache_serving_path_through_the_triton_kernels(tiny_models):
    """Chunked prefill and decode of rows at different positions, every kernel Triton's, against the plain path."""
    from sqdeploy.kernels import load_for_device
    from sqdeploy.kernels.slots import SlotCache, SlotDecoder, kv_bytes_per_token, plan_slots, prefill_chunk
    from sqdeploy.model.checkpoint import HFCheckpoint

    model = load_for_device(HFCheckpoint(tiny_models["llama"]), "cpu")
    prompts = [torch.randint(3, 8000, (n,), generator=GEN) for n in (9, 4)]
    cont = [[11, 12, 13], [14, 15, 16]]
    ops.FORCE_TRITON = True
    try:
        cache = SlotCache(model, plan_slots(kv_bytes_per_token(model), 32, 2, None))
        slots = [cache.acquire(), cache.acquire()]
        prefill_chunk(model, cache, slots[0], prompts[0][:5], 0)
        first = [prefill_chunk(model, cache, slots[1], prompts[1], 0), prefill_chunk(model, cache, slots[0], prompts[0][5:], 5)]
        dec = SlotDecoder(model, cache)
        cache.active[slots] = 1
        steps = []
        for i in range(3):
            cache.next_ids[slots[0]], cache.next_ids[slots[1]] = cont[0][i], cont[1][i]
            steps.append(dec.step(slots).clone())
    finally:
        ops.FORCE_TRITON = False
    with torch.no_grad():
        for row, (p, c) in enumerate(zip(prompts, cont)):
            want = model(torch.cat([p, torch.tensor(c)])[None])[0, len(p) - 1 :]
            got = torch.stack([first[1 - row]] + [s[slots[row]] for s in steps])
            assert _rel(got, want) < 1e-4
