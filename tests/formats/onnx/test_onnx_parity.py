"""ONNX export parity: ONNX Runtime (CPU) against the PyTorch reference of the same quantized directory.

Every family's tiny random config, every graph form. Forms whose arithmetic is the
reference's (float32, weight-only N-bit) must match to float32 rounding; forms with
INT8 activations match up to rounding flips at quantization boundaries (a 1-ulp
difference upstream moves a value across a .5 boundary), so they are held to top-1
agreement (on positions whose top-1 lead is above numerical noise: random weights make
near-ties) and a tight bound on the median difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqdeploy.formats.onnx.check import KV_QUANT_REL_MAX, graph_rows
from sqdeploy.formats.onnx.contract import read_manifest
from sqdeploy.formats.onnx.options import OnnxOptions
from sqdeploy.formats.onnx.session import OnnxDecoder, SessionConfig
from sqdeploy.formats.onnx.writer import write_onnx
from sqdeploy.model import load_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.qmodel import QuantizedModel

# form -> (recipe, variant, int4 format, exact arithmetic)
FORMS = {
    "fp32": ("fp16", "tensorrt", None, True),
    "fp32-ort": ("fp16", "onnxruntime", None, True),
    "w8a8-qdq": ("w8a8-sq", "tensorrt", None, False),
    "w4-qdq": ("w4a16-rtn", "tensorrt", "qdq", True),
    "w4-matmulnbits": ("w4a16-rtn", "onnxruntime", "matmulnbits", True),
    "w8a8-pertoken-ort": ("w8a8-sq-pertoken", "onnxruntime", None, False),
}
# the SmoothQuant recipes with a fixed alpha: the graph form is the same, without the alpha search's cost
FAST_RECIPES = {
    "w8a8-sq": "scheme: w8a8-channel-static\nalgorithm: {name: smoothquant, alpha: 0.5}\n",
    "w8a8-sq-pertoken": "scheme: w8a8-channel-token\nalgorithm: {name: smoothquant, alpha: 0.5}\n",
}
SEQ = 80  # longer than the tiny Mistral's sliding window (64)


@pytest.fixture(scope="module")
def quantized(tiny_models, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-q")
    cache: dict[tuple[str, str], QuantizedModel] = {}

    def get(family: str, recipe: str) -> QuantizedModel:
        if (family, recipe) not in cache:
            spec = recipe
            if recipe in FAST_RECIPES:
                spec = root / f"{recipe}.yaml"
                spec.write_text(f"name: {recipe}\n" + FAST_RECIPES[recipe])
            out, _ = quantize_to_dir(tiny_models[family], spec, root / f"{family}-{recipe}",
                                     Calibration(str(calib_file), 4, 64), Runtime(progress=False))
            cache[family, recipe] = QuantizedModel(out)
        return cache[family, recipe]

    return get


def export(qm: QuantizedModel, out, variant="tensorrt", int4_format=None, dtype="float32", **kw):
    """Write the graph, hold it to sq-check's graph rows (full onnx.checker, signature, op counts), open it."""
    out.mkdir(parents=True)
    opts = OnnxOptions(variant=variant, dtype=dtype, int4_format=int4_format, **kw)
    write_onnx(qm.path, out, opts, str(qm.path), progress=False)
    failed = [(r.check, r.detail) for r in graph_rows(out, read_manifest(out)) if not r.ok]
    assert not failed, failed
    return OnnxDecoder(out, SessionConfig(threads=2))


def batch(vocab: int = 8000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :9] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("form", sorted(FORMS))
def test_onnxruntime_matches_reference(tiny_model, quantized, tmp_path, form):
    recipe, variant, fmt, exact = FORMS[form]
    qm = quantized(tiny_model.name, recipe)
    dec = export(qm, tmp_path / "onnx", variant, fmt)
    ref = load_model(qm)
    ids, mask = batch()
    with torch.no_grad():
        r = ref(ids, attention_mask=mask)
    o = torch.from_numpy(dec.forward(ids.numpy(), mask.numpy())[0])
    real = mask.bool()
    scale = r.abs().max()
    rel = ((o - r).abs()[real] / scale)
    # random weights give near-ties: count top-1 where the reference's lead exceeds 1% of the logit scale
    top2 = r.topk(2, dim=-1).values
    decisive = real & (top2[..., 0] - top2[..., 1] > 0.01 * scale)
    top1 = (o.argmax(-1) == r.argmax(-1))[decisive].float().mean()
    if exact:
        assert rel.max() < 1e-5, f"{form}: max rel diff {rel.max():.2e}"
    else:
        assert rel.median() < 1e-5 and rel.max() < 2e-2, f"{form}: rel diff median {rel.median():.2e} max {rel.max():.2e}"
        assert top1 >= 0.99, f"{form}: top-1 agreement {top1:.4f}"
    if variant == "tensorrt":  # standard attention also reproduces the reference at padded query positions
        assert ((o - r).abs() / scale).max() < (1e-5 if exact else 2e-2)


@pytest.mark.parametrize("form", ["fp32", "fp32-ort", "w4-matmulnbits", "w8a8-qdq", "w8a8-pertoken-ort"])
def test_kv_cache_decode_equals_full_pass(tiny_model, quantized, tmp_path, form):
    recipe, variant, fmt, _ = FORMS[form]
    dec = export(quantized(tiny_model.name, recipe), tmp_path / "onnx", variant, fmt)
    ids, mask = batch()
    full, _ = dec.forward(ids.numpy(), mask.numpy())
    logits, past = dec.forward(ids[:, :50].numpy(), mask[:, :50].numpy())
    steps = [logits]
    for t in range(50, SEQ):
        logits, past = dec.forward(ids[:, t:t + 1].numpy(), mask[:, :t + 1].numpy(), None, past)
        steps.append(logits)
        assert past["past_key_values.0.key"].shape == (2, dec.kv_heads, t + 1, dec.head_dim)
    inc = np.concatenate(steps, axis=1)
    real = mask.bool().numpy()
    rel = np.abs(inc - full)[real].max() / np.abs(full).max()
    if FORMS[form][0] == "w8a8-sq-pertoken":  # decode and prefill kernels differ in the last bit: INT8 rounding flips
        assert rel < KV_QUANT_REL_MAX and (inc.argmax(-1) == full.argmax(-1))[real].mean() >= 0.99
    else:
        assert rel < 1e-3


@pytest.mark.parametrize("variant", ["tensorrt", "onnxruntime"])
def test_left_padding_gives_the_unpadded_logits(tiny_models, quantized, tmp_path, variant):
    dec = export(quantized("llama", "fp16"), tmp_path / "onnx", variant)
    ids, mask = batch()
    padded, _ = dec.forward(ids.numpy(), mask.numpy())
    alone, _ = dec.forward(ids[1:, 9:].numpy())
    assert np.abs(padded[1, 9:] - alone[0]).max() / np.abs(alone).max() < 1e-5


def test_float16_graph(tiny_models, quantized, tmp_path):
    qm = quantized("qwen2", "w4a16-rtn")
    dec = export(qm, tmp_path / "onnx", "onnxruntime", "matmulnbits", dtype="float16")
    assert dec.meta["dtype"] == "float16"
    ids, _ = batch()
    o, past = dec.forward(ids.numpy())
    assert o.dtype == np.float16 and past["past_key_values.1.value"].dtype == np.float16
    with torch.no_grad():
        r = load_model(qm)(ids)
    top1 = (torch.from_numpy(o.astype(np.float32)).argmax(-1) == r.argmax(-1)).float().mean()
    assert top1 >= 0.99 and np.abs(o - r.numpy()).max() / r.abs().max() < 5e-3


def test_int8_lm_head(tiny_models, quantized, tmp_path):
    qm = quantized("llama", "w4a16-rtn")
    dec = export(qm, tmp_path / "onnx", "onnxruntime", "matmulnbits", lm_head="int8")
    assert dec.meta["lm_head"] == "int8"
    assert sum(n.op_type == "MatMulNBits" for n in _graph(dec).node) == dec.meta["quantization"]["quantized_matmuls"] + 1
    ids, _ = batch()
    with torch.no_grad():
        r = load_model(qm)(ids)
    o = torch.from_numpy(dec.forward(ids.numpy())[0])
    assert (o - r).abs().max() / r.abs().max() < 2e-2 and (o.argmax(-1) == r.argmax(-1)).float().mean() >= 0.95


def _graph(dec):
    import onnx

    return onnx.load(str(dec.path / "model.onnx")).graph


def test_gqa_shared_past_present_buffer(tiny_models, quantized, tmp_path):
    """The onnxruntime variant can update a fixed-capacity cache in place (past and present bound to one buffer)."""
    import onnxruntime as ort

    dec = export(quantized("mistral", "fp16"), tmp_path / "onnx", "onnxruntime")
    ids, _ = batch()
    full, _ = dec.forward(ids[:1].numpy())
    cap = SEQ + 4
    buffers = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, dec.kv_heads, cap, dec.head_dim), np.float32))
               for n in dec.meta["inputs"][3:]}
    io, steps = dec.session.io_binding(), []
    for t in [slice(0, 40)] + [slice(k, k + 1) for k in range(40, SEQ)]:
        io.bind_cpu_input("input_ids", ids[:1, t].numpy())
        io.bind_cpu_input("attention_mask", np.ones((1, t.stop), np.int64))
        io.bind_cpu_input("position_ids", np.arange(t.start, t.stop, dtype=np.int64)[None])
        io.bind_output("logits", "cpu")
        for name, buf in buffers.items():
            io.bind_ortvalue_input(name, buf)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), buf)
        dec.session.run_with_iobinding(io)
        steps.append(io.get_outputs()[0].numpy())
        io.clear_binding_inputs()
        io.clear_binding_outputs()
    inc = np.concatenate(steps, axis=1)
    assert np.abs(inc - full).max() / np.abs(full).max() < 1e-5
