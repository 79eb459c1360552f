"""The real shared model through ONNX Runtime: logits, top-1 agreement and perplexity against the PyTorch reference.

Kept cheap for the suite (a small calibration set, 3 windows of 512); the 24-window
figures are in the README, produced by ``sq-check onnx --text ... --windows 24 --seq-len 512``.
"""

from __future__ import annotations

import pytest
import torch

from sqdeploy.evaluate.perplexity import eval_windows, perplexity, read_text
from sqdeploy.evaluate.rounding_noise import RoundingNoise, compare
from sqdeploy.formats.onnx.options import OnnxOptions
from sqdeploy.formats.onnx.session import OnnxDecoder, SessionConfig
from sqdeploy.formats.onnx.writer import write_onnx
from sqdeploy.model import load_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, load_tokenizer, quantize_to_dir
from sqdeploy.quantize.qmodel import QuantizedModel
from tests.conftest import HELDOUT, HUMANEVAL

# w8a8-sq's layout with a fixed alpha (the alpha search costs minutes and does not change the graph form)
W8A8 = "name: w8a8-sq-a05\nscheme: w8a8-channel-static\nalgorithm: {name: smoothquant, alpha: 0.5}\n"


@pytest.mark.parametrize("recipe, variant, int4_format", [("w8a8", "tensorrt", None), ("w4a16-rtn", "onnxruntime", "matmulnbits")])
def test_shared_model_parity(shared_model, tmp_path, recipe, variant, int4_format):
    if not HELDOUT.exists() or not HUMANEVAL.exists():
        pytest.skip("shared data not found")
    if recipe == "w8a8":
        recipe = tmp_path / "w8a8.yaml"
        recipe.write_text(W8A8)
    q, _ = quantize_to_dir(shared_model, recipe, tmp_path / "q", Calibration(str(HUMANEVAL), 8, 128), Runtime(progress=False))
    (tmp_path / "onnx").mkdir()
    write_onnx(q, tmp_path / "onnx", OnnxOptions(variant, "float32", int4_format), str(q), progress=False)
    dec = OnnxDecoder(tmp_path / "onnx", SessionConfig(threads=2))
    windows = eval_windows(load_tokenizer(shared_model), read_text(HELDOUT), 24, 512)[::8]
    ref = load_model(QuantizedModel(q))
    with torch.no_grad():
        ref_logits = {i: ref(w[None]) for i, w in enumerate(windows)}
    ort_logits = {i: dec.logits_fn(w[None]) for i, w in enumerate(windows)}
    if int4_format:  # weight-only, float32 activations: the reference's arithmetic
        top1 = torch.cat([(ort_logits[i].argmax(-1) == ref_logits[i].argmax(-1)).flatten() for i in ort_logits]).float().mean()
        assert top1 >= 0.99
    else:  # INT8 activations: rounding flips make top-1 CPU-dependent; hold the export to the size of the flips,
        # measured by evaluating the same quantized model in float64 (see sqdeploy.evaluate.rounding_noise)
        ref64 = load_model(QuantizedModel(q), torch.float64)
        with torch.no_grad():
            noise = RoundingNoise.measure(ref_logits.values(), (ref64(w[None]) for w in windows))
        c = compare(list(ort_logits.values()), list(ref_logits.values()), noise)
        assert c.within_noise, c.describe()
        assert c.explained, c.describe_top1()
        # ... and the same bar refuses an export with one wrong weight scale (down_proj of layer 5, 20% too large)
        bad = _with_scaled_initializer(tmp_path / "onnx", tmp_path / "bad", "layers.5.down.scale", 1.2)
        bad_logits = [bad.logits_fn(w[None]) for w in windows]
        assert not compare(bad_logits, list(ref_logits.values()), noise).within_noise
    index = {tuple(w.tolist()): i for i, w in enumerate(windows)}
    p_ref = perplexity(lambda ids: ref_logits[index[tuple(ids[0].tolist())]], windows).ppl
    p_ort = perplexity(lambda ids: ort_logits[index[tuple(ids[0].tolist())]], windows).ppl
    assert abs(p_ort / p_ref - 1) < 0.005
    if int4_format:  # weight-only, float32 activations: the reference's arithmetic
        worst = max(float((ort_logits[i] - ref_logits[i]).abs().max() / ref_logits[i].abs().max()) for i in ort_logits)
        assert worst < 1e-4


def _with_scaled_initializer(src, out, name: str, factor: float) -> OnnxDecoder:
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, out)
    model = onnx.load(str(out / "model.onnx"))
    (init,) = [i for i in model.graph.initializer if i.name == name]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name))
    onnx.save(model, str(out / "model.onnx"))
    return OnnxDecoder(out, SessionConfig(threads=2))
