"""Conformance with NVIDIA ModelOpt's export_tensorrt_llm_checkpoint (the producer TensorRT-LLM's
own converter delegates SmoothQuant and AWQ to): same tensor names, shapes and dtypes per rank.

Without ModelOpt the comparison runs against manifests of ModelOpt 0.47's real exports
of the shared model (tests/data/modelopt_*.json, made by tools/modelopt_reference.py);
with ModelOpt installed it also exports a small model with both tools and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sqdeploy.formats.trtllm.config import QuantSpec, build_config, parse_config
from sqdeploy.formats.trtllm.names import expected_tensors
from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from tests.formats.trtllm.test_trtllm_support import SQ_STATIC, export, int4_recipe, recipe

DATA = Path(__file__).resolve().parents[2] / "data"
ST = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "int8": "I8"}
# manifest -> (recipe, quant spec, tp); fixed-alpha recipes give the layouts of w8a8-sq / w4a16-* without their searches
CASES = {
    "modelopt_int8_sq_tp1.json": (SQ_STATIC, QuantSpec("W8A8_SQ_PER_CHANNEL"), 1),
    "modelopt_int8_sq_tp2.json": (SQ_STATIC, QuantSpec("W8A8_SQ_PER_CHANNEL"), 2),
    "modelopt_int4_awq_tp1.json": (int4_recipe(128), QuantSpec("W4A16_AWQ", None, 128, False, True), 1),
}
SAME_CONFIG = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_size", "intermediate_size", "norm_epsilon", "vocab_size", "hidden_act", "position_embedding_type",
               "max_position_embeddings", "use_parallel_embedding", "embedding_sharding_dim", "mapping")


def _manifest(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _expected_layout(spec) -> dict[str, list]:
    """name -> [shape, safetensors dtype] as sq-deploy writes it (float scales of AWQ are float32)."""
    out = {}
    for name, e in expected_tensors(spec).items():
        dtype = {"model": spec.dtype, "float": "float32", "model_or_float32": spec.dtype}.get(e.dtype, e.dtype)
        out[name] = [list(e.shape), ST[dtype]]
    return out


@pytest.mark.parametrize("manifest", sorted(CASES))
def test_layout_equals_modelopt_manifest(manifest, shared_model):
    _, quant, tp = CASES[manifest]
    man = _manifest(manifest)
    ck = HFCheckpoint(shared_model)
    cfg = build_config(ck.family, ck.config, quant, tp, "float16")
    ours = _expected_layout(parse_config(json.loads(json.dumps(cfg))))
    assert len(man["ranks"]) == tp
    for rank, theirs in man["ranks"].items():
        assert ours == {k: list(v) for k, v in theirs.items()}, rank
    for key in SAME_CONFIG:
        assert cfg[key] == man["config"][key], key
    for key in ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale"):
        assert cfg["quantization"].get(key) == man["config"]["quantization"].get(key), key


def _headers(path: Path) -> dict[str, list]:
    with safe_open(path, "pt") as f:
        return {k: [list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()] for k in f.keys()}


@pytest.fixture(scope="module")
def two_layer_shared(tmp_path_factory, shared_model):
    """The shared model's architecture (GQA 6/2, hidden 384, fp16) with 2 random layers."""
    from sqdeploy.testing.random_model import make_random_model

    spec = {k: v for k, v in json.loads((shared_model / "config.json").read_text()).items() if k not in ("dtype", "transformers_version")}
    spec["num_hidden_layers"] = 2
    return make_random_model(spec, tmp_path_factory.mktemp("shared2") / "m", dtype=torch.float16, tokenizer_from=shared_model)


@pytest.mark.parametrize("manifest", sorted(CASES))
def test_exported_files_equal_modelopt_manifest(manifest, two_layer_shared, calib_file, tmp_path):
    """A real export of the shared architecture: its files carry ModelOpt's names, shapes and dtypes (layers 0-1)."""
    spec, _, tp = CASES[manifest]
    q = tmp_path / "q"
    quantize_to_dir(two_layer_shared, recipe(spec), q, Calibration(str(calib_file), 2, 64), Runtime(progress=False), keep_source=True)
    export(q, tmp_path / "ckpt", tp)
    for rank, theirs in _manifest(manifest)["ranks"].items():
        kept = {k: list(v) for k, v in theirs.items() if not k.startswith("transformer.layers.") or k.split(".")[2] in ("0", "1")}
        assert _headers(tmp_path / "ckpt" / f"rank{rank}.safetensors") == kept


def test_unified_hf_equals_modelopt_manifest(two_layer_shared, calib_file, tmp_path):
    """--target trtllm-hf against ModelOpt's export_hf_checkpoint (INT4 AWQ) of the shared model."""

    from sqdeploy.formats.trtllm.hf_unified import write as write_hf

    man = _manifest("modelopt_int4_awq_hf.json")
    q = tmp_path / "q"
    quantize_to_dir(two_layer_shared, recipe(int4_recipe(128)), q, Calibration(str(calib_file), 2, 64), Runtime(progress=False), keep_source=True)
    out = tmp_path / "hf"
    out.mkdir()
    write_hf(q, out, progress=False)
    ours = _headers(out / "model.safetensors")
    theirs = {k: v for k, v in man["tensors"].items() if ".layers." not in k or k.split(".")[2] in ("0", "1")}
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    # packed weights and scales as ModelOpt stores them; float tensors in the model's dtype (ModelOpt's run was float32)
    assert {k: v[1] for k, v in ours.items() if v[1] in ("U8",) or k.endswith("weight_scale")} == {
        k: v[1] for k, v in theirs.items() if v[1] in ("U8",) or k.endswith("weight_scale")}
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert hq["quantization"] == man["hf_quant_config"]["quantization"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "producer"} == {k: v for k, v in man["quantization_config"].items() if k != "producer"}


# ------------------------------------------------------------------ live ModelOpt
def _modelopt_export(model_dir: Path, cfg_name: str, tp: int, out: Path, ids: torch.Tensor) -> Path:
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = mtq.quantize(model, getattr(mtq, cfg_name), lambda m: m(ids))
    export_tensorrt_llm_checkpoint(model, "llama", torch.float16, out, inference_tensor_parallel=tp)
    return out


@pytest.mark.parametrize("manifest", ["modelopt_int8_sq_tp2.json", "modelopt_int4_awq_tp1.json"])
def test_same_layout_as_live_modelopt(manifest, two_layer_shared, calib_file, tmp_path):
    pytest.importorskip("modelopt.torch.export", reason="ModelOpt is not installed (pip install nvidia-modelopt requests)")
    spec, _, tp = CASES[manifest]
    cfg_name = "INT8_SMOOTHQUANT_CFG" if "int8" in manifest else "INT4_AWQ_CFG"
    ids = torch.randint(0, 8000, (2, 64), generator=torch.Generator().manual_seed(0))
    theirs = _modelopt_export(two_layer_shared, cfg_name, tp, tmp_path / "modelopt", ids)
    q = tmp_path / "q"
    quantize_to_dir(two_layer_shared, recipe(spec), q, Calibration(str(calib_file), 2, 64), Runtime(progress=False), keep_source=True)
    export(q, tmp_path / "ours", tp)
    for r in range(tp):
        assert _headers(tmp_path / "ours" / f"rank{r}.safetensors") == _headers(theirs / f"rank{r}.safetensors")
    mine = json.loads((tmp_path / "ours" / "config.json").read_text())
    ref = json.loads((theirs / "config.json").read_text())
    assert {k: mine[k] for k in SAME_CONFIG} == {k: ref[k] for k in SAME_CONFIG}
