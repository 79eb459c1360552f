"""transformers (with compressed-tensors) loads every quantized directory sq-deploy writes, and
computes the logits sq-eval's reader computes from the same directory.

Both sides dequantize the same stored integers and run the same float32 torch operations, so
where the arithmetic is the same the logits agree to float32 rounding (bound: 1e-5 x max |logit|;
measured: bit-identical). The one known difference is the dynamic activation scale:
compressed-tensors divides the abs-max by 127.5 (its symmetric range (127 - (-128)) / 2), sq-deploy
by 127 as TensorRT-LLM, vLLM and ONNX Runtime do. The comparison therefore runs the reference with
compressed-tensors' divisor, which must make it match, and checks that the default divisor does
differ, as the README says.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sqdeploy.core import qmath
from sqdeploy.formats.readers import open_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.recipes import builtin_recipes, load_recipe, parse_recipe

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

CT_DYNAMIC_DIVISOR = 127.5  # compressed_tensors.quantization.utils.calculate_qparams, symmetric branch
REL_TOL = 1e-5
SPEED = {"rtn": 0, "none": 0, "smoothquant": 1}  # cheapest algorithm first: the format depends on the scheme only


def _schemes() -> dict[str, dict]:
    """One recipe per distinct scheme of the built-in recipes, plus symmetric INT4 (TensorRT's form)."""
    chosen: dict[str, tuple[int, dict]] = {}
    for name in builtin_recipes():
        r = load_recipe(name)
        key = json.dumps(r.scheme.to_dict(), sort_keys=True)
        cost = SPEED.get(r.algorithm, 2)
        if key not in chosen or cost < chosen[key][0]:
            chosen[key] = (cost, {"name": name, "scheme": r.scheme.to_dict(), "algorithm": r.to_dict()["algorithm"]})
    out = {spec["name"]: spec for _, spec in chosen.values()}
    out["w4a16-sym"] = {"name": "w4a16-sym", "algorithm": "rtn",
                        "scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 64, "symmetric": True}}}
    return out


SCHEMES = _schemes()


@pytest.fixture(scope="module")
def quantized_dirs(tiny_models, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    calib = Calibration(str(calib_file), samples=4, seq_len=64)
    out = {}
    for name, spec in SCHEMES.items():
        out[name], _ = quantize_to_dir(tiny_models["llama"], parse_recipe(spec, origin=name), root / name, calib,
                                       Runtime(progress=False))
    return out


def _hf_logits(path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # plain call: no loader options
    with torch.no_grad():
        return model(ids).logits.float()


def _ours(path, ids, divisor: float, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(qmath, "ACT_QMAX", divisor)
    try:
        return open_model(path).logits_fn(ids).float()
    finally:
        monkeypatch.setattr(qmath, "ACT_QMAX", 127.0)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_transformers_loads_directory_with_sq_eval_logits(name, quantized_dirs, monkeypatch):
    path = quantized_dirs[name]
    torch.manual_seed(0)
    ids = torch.randint(4, 8000, (2, 48))
    theirs = _hf_logits(path, ids)
    spec = SCHEMES[name]["scheme"]
    dynamic = spec.get("act", {}).get("kind", "none") in ("dynamic_token", "dynamic_tensor")
    ours = _ours(path, ids, CT_DYNAMIC_DIVISOR if dynamic else 127.0, monkeypatch)
    diff = (theirs - ours).abs().max().item()
    assert diff <= REL_TOL * ours.abs().max().item(), f"{name}: max |logit diff| {diff:.3g}"
    if dynamic:  # the documented divisor difference is real: sq-deploy's own grid gives other logits
        default = _ours(path, ids, 127.0, monkeypatch)
        assert (theirs - default).abs().max().item() > 10 * REL_TOL * ours.abs().max().item()


def test_asymmetric_int4_declares_dequantize_for_transformers(quantized_dirs):
    """The key that makes transformers load asymmetric pack-quantized weights with compressed-tensors 0.20."""
    qc = json.loads((quantized_dirs["w4a16-rtn"] / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["dequantize"] is True
    sym = json.loads((quantized_dirs["w4a16-sym"] / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in sym


def test_smoothing_vectors_live_outside_the_weights_namespace(quantized_dirs, tmp_path):
    """``*.safetensors`` beside the weights holds weights only; old directories still read."""
    import shutil

    from sqdeploy.quantize.qmodel import OLD_SMOOTHING, SMOOTHING, QuantizedModel

    path = quantized_dirs["w8a8-sq"]
    assert (path / SMOOTHING).exists() and not (path / OLD_SMOOTHING).exists()
    assert {p.name for p in path.glob("*.safetensors")} <= {"model.safetensors"} | {p.name for p in path.glob("model-*")}
    vectors = QuantizedModel(path).smoothing()
    assert vectors
    old = tmp_path / "old"
    shutil.copytree(path, old)
    (old / SMOOTHING).rename(old / OLD_SMOOTHING)
    again = QuantizedModel(old).smoothing()
    assert again.keys() == vectors.keys() and all(torch.equal(again[k], vectors[k]) for k in vectors)
