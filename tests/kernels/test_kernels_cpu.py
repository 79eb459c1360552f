"""The GPU kernel path held to the fake-quant reference on the CPU.

Off CUDA the kernel modules run the exact PyTorch arithmetic of ``sqdeploy.kernels.reference``
(INT8 products summed exactly, INT4 dequantized as qmath does), so the whole kernel model
(fused q|k|v and gate|up, fused norms, INT8 activations, static KV cache) must reproduce the
reference model to float32 rounding. With activation quantization a last-bit difference can
move one activation by one INT8 step, so those models get a looser bound plus identical
greedy tokens; every single linear is still held to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from sqdeploy.core import qmath
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.schemes import ActScheme, QuantScheme, WeightScheme
from sqdeploy.kernels import GraphDecoder, StaticKVCache, greedy_generate, load_for_device, prepare_model, resolve_device
from sqdeploy.kernels import reference as ref
from sqdeploy.kernels.linears import build_linear
from sqdeploy.kernels.packing import dequantize_int4, int4_from_spec, pack_int4, scale_dtype, unpack_int4
from sqdeploy.kernels.spec import can_concat, spec_from_qweight
from sqdeploy.model.generate import greedy_generate as ref_greedy
from sqdeploy.model.layers import QLinear
from sqdeploy.model.loading import load_model
from sqdeploy.model.transformer import KVCache
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.qmodel import QuantizedModel
from sqdeploy.quantize.recipes import parse_recipe

IDS = torch.randint(0, 8000, (2, 19), generator=torch.Generator().manual_seed(0))


def _rtn(name, weight, act="none"):
    return parse_recipe({"name": name, "scheme": {"weight": weight, "act": {"kind": act}}, "algorithm": "rtn"})


RECIPES = {
    "fp16": "fp16",
    "w8a8-static": _rtn("w8a8-static", {"bits": 8, "granularity": "channel"}, "static_tensor"),
    "w8a8-token": _rtn("w8a8-token", {"bits": 8, "granularity": "channel"}, "dynamic_token"),
    "w4a16-asym": "w4a16-rtn",
}


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory, tiny_models, calib_file):
    root, made = tmp_path_factory.mktemp("kq"), {}

    def get(family, recipe):
        if (family, recipe) not in made:
            out = root / f"{family}-{recipe}"
            quantize_to_dir(tiny_models[family], RECIPES[recipe], out, Calibration(str(calib_file), 2, 32),
                            Runtime(progress=False))
            made[(family, recipe)] = out
        return QuantizedModel(made[(family, recipe)])

    return get


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ packing and arithmetic

def test_int4_packing_round_trip():
    q = torch.randint(0, 16, (48, 256), dtype=torch.int8)
    q[:, 7::8] = 15  # the top nibble makes the int32 word negative
    packed = pack_int4(q)
    assert packed.shape == (32, 48) and packed.dtype == torch.int32 and int(packed.min()) < 0
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(SqDeployError):
        pack_int4(q[:, :12])


@pytest.mark.parametrize("ws", [WeightScheme(4, "group", 32, False), WeightScheme(4, "group", 128, True),
                                WeightScheme(4, "channel", symmetric=True)])
def test_int4_layout_dequantizes_like_qmath(ws):
    w = torch.randn(40, 256)
    qw = qmath.quantize_weight(w, ws)
    spec = spec_from_qweight(qw, QuantScheme(ws), None)
    got = dequantize_int4(int4_from_spec(spec, compact_scales=False))
    assert torch.equal(got, qmath.dequantize_weight(qw, ws))


def test_scales_stay_float32_where_float16_would_round_them():
    assert scale_dtype(torch.tensor([1e-3, 2e-2]), compact=True) == torch.float16
    assert scale_dtype(torch.tensor([1e-3, 1e-6]), compact=True) == torch.float32
    assert scale_dtype(torch.tensor([1e-3, 1e-8]), compact=True) == torch.float16  # all-zero group
    assert scale_dtype(torch.tensor([1e-3]), compact=False) == torch.float32


@pytest.mark.parametrize("kind", ["static_tensor", "dynamic_token", "dynamic_tensor"])
def test_quantized_activations_equal_qmath(kind):
    x = torch.randn(7, 96) * 3
    static = torch.tensor([0.031])
    qa = ref.quantize(x, ref.input_quant(kind, static))
    scale = qa.scale if qa.scale.numel() == 1 else qa.scale[:, None]
    assert torch.equal(qa.q.float() * scale, qmath.fake_quant_act(x, ActScheme(kind), static))


@pytest.mark.parametrize("kind", ["static_tensor", "dynamic_token"])
def test_w8a8_linear_equals_fake_quant_linear(kind):
    ws, act = WeightScheme(8, "channel"), ActScheme(kind)
    w, b, x = torch.randn(64, 128), torch.randn(64), torch.randn(5, 128)
    qw = qmath.quantize_weight(w, ws)
    static = torch.tensor([0.04]) if act.static else None
    lin = QLinear(128, 64, True)
    lin.weight.data, lin.bias.data, lin.act, lin.input_scale = qmath.dequantize_weight(qw, ws), b, act, static
    kl = build_linear(spec_from_qweight(qw, QuantScheme(ws, act), b, static), "cpu", torch.float32)
    assert _rel(kl(x), lin(x)) < 1e-6


# ------------------------------------------------------------------ whole models

@pytest.mark.parametrize("recipe", list(RECIPES))
def test_kernel_model_matches_reference_llama(qdirs, recipe):
    qm = qdirs("llama", recipe)
    model = load_model(qm)
    km = prepare_model(model, "cpu", qm)
    exact = not qm.scheme.act.quantized
    with torch.no_grad():
        assert _rel(km(IDS), model(IDS)) < (1e-5 if exact else 5e-3)
        c1, c2 = KVCache(len(km.layers)), KVCache(len(model.layers))
        km(IDS[:, :12], cache=c1), model(IDS[:, :12], cache=c2)
        assert _rel(km(IDS[:, 12:13], cache=c1), model(IDS[:, 12:13], cache=c2)) < (1e-5 if exact else 5e-3)
    prompt = IDS[0, :8].tolist()
    assert greedy_generate(km, [prompt], 10) == [ref_greedy(model, prompt, 10)]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "opt"])
def test_kernel_model_matches_reference_other_families(qdirs, family):
    qm = qdirs(family, "w4a16-asym")
    model = load_model(qm)
    km = load_for_device(qm, "cpu")
    with torch.no_grad():
        assert _rel(km(IDS), model(IDS)) < 1e-5


def test_static_cache_past_the_sliding_window(qdirs):
    """Mistral's window is 64: decode at positions 70+ must drop the oldest keys."""
    qm = qdirs("mistral", "fp16")
    model = load_model(qm)
    km = prepare_model(model, "cpu")
    ids = torch.randint(0, 8000, (1, 75), generator=torch.Generator().manual_seed(1))
    dec = GraphDecoder(km, 1, 80)
    with torch.no_grad():
        dec.prefill(ids[:, :70])
        for t in range(70, 75):
            dec.ids.copy_(ids[:, t : t + 1])
            dec.step()
            assert _rel(dec.logits, model(ids[:, : t + 1])[:, -1]) < 1e-5


def test_unequal_static_scales_run_unfused(qdirs):
    """q, k and v with different calibrated scales cannot share one INT8 input: separate GEMMs, same numbers."""
    qm = qdirs("llama", "w8a8-static")
    model = load_model(qm)
    qm_scales = qm.input_scale
    qm.input_scale = lambda i, n: qm_scales(i, n) * (1.5 if n == "k" else 1.0)
    try:
        km = prepare_model(model, "cpu", qm)
        for i, block in enumerate(model.layers):
            block.attn.k.input_scale = qm.input_scale(i, "k")
    finally:
        qm.input_scale = qm_scales
    assert isinstance(km.layers[0].attn.qkv, torch.nn.ModuleList)
    with torch.no_grad():
        assert _rel(km(IDS), model(IDS)) < 5e-3


def test_specs_with_different_input_quantization_do_not_fuse():
    ws = WeightScheme(8, "channel")
    qw = qmath.quantize_weight(torch.randn(8, 16), ws)
    a = spec_from_qweight(qw, QuantScheme(ws, ActScheme("static_tensor")), None, torch.tensor([0.1]))
    b = spec_from_qweight(qw, QuantScheme(ws, ActScheme("static_tensor")), None, torch.tensor([0.2]))
    assert can_concat([a, a]) and not can_concat([a, b])


# ------------------------------------------------------------------ bad input

def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SqDeployError, match="no CUDA GPU"):
        resolve_device("cuda", None)


def test_int4_weights_with_int8_activations_are_refused():
    ws = WeightScheme(4, "group", 32, True)
    qw = qmath.quantize_weight(torch.randn(8, 64), ws)
    with pytest.raises(SqDeployError, match="no kernel"):
        build_linear(spec_from_qweight(qw, QuantScheme(ws, ActScheme("dynamic_token")), None), "cpu", torch.float32)


def test_quantized_model_without_integer_weights_is_refused(qdirs):
    model = load_model(qdirs("llama", "w8a8-token"))
    with pytest.raises(SqDeployError, match="source=QuantizedModel"):
        prepare_model(model, "cpu")


def test_static_cache_refuses_padding_and_overflow(qdirs):
    km = prepare_model(load_model(qdirs("llama", "fp16")), "cpu")
    cache = StaticKVCache(len(km.layers), 2, 8, 2, km.cfg.head_dim, torch.float32, "cpu")
    with pytest.raises(SqDeployError, match="equal-length"):
        km(IDS[:, :4], attention_mask=torch.ones(2, 4), cache=cache)
    with pytest.raises(SqDeployError, match="holds 8 positions"):
        km(IDS[:, :9], cache=cache)
