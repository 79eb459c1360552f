"""sq-build --engine tensorrt: the builder plan (profiles from the graph's axes, typing, flags) on a tiny graph."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sqdeploy.cli.build import main as build_main
from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.engines.gpus import get_gpu
from sqdeploy.engines.tensorrt import TrtOptions, build_trt, plan_trt
from sqdeploy.testing.tiny_onnx import write_tiny_onnx_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_model):
    return write_tiny_onnx_dir(tmp_path_factory.mktemp("onnx") / "tiny", tokenizer_from=shared_model, variant="tensorrt")


def edit_graph(src, dst, edit):
    """Copy an export directory with its graph changed by ``edit(model)``."""
    import shutil

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    edit(model)
    onnx.save_model(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst


def add_qdq(model):
    """Fake-quantize the LM head's input (INT8 per tensor), as a W8A8 export does."""
    g = model.graph
    head = next(n for n in g.node if n.output[0] == "logits")
    g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "act_scale"),
                          numpy_helper.from_array(np.array(0, np.int8), "act_zero")])
    g.node.extend([helper.make_node("QuantizeLinear", [head.input[0], "act_scale", "act_zero"], ["x_q"]),
                   helper.make_node("DequantizeLinear", ["x_q", "act_scale", "act_zero"], ["x_dq"])])
    head.input[0] = "x_dq"
    nodes = list(g.node)
    nodes.remove(head)
    del g.node[:]
    g.node.extend(nodes + [head])


def add_contrib_op(model):
    g = model.graph
    head = next(n for n in g.node if n.output[0] == "logits")
    g.node.append(helper.make_node("Gelu", [head.input[0]], ["x_gelu"], domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def test_profiles_from_dynamic_axes(tiny, tmp_path):
    plan = plan_trt(tiny, tmp_path / "eng", TrtOptions(gpu=get_gpu("a100-40g"), max_batch_size=8))
    context, decode = plan.profiles
    assert context.shapes["input_ids"] == ((1, 1), (4, 64), (8, 128))
    assert context.shapes["attention_mask"] == ((1, 1), (4, 64), (8, 128))
    assert context.shapes["past_key_values.1.value"] == ((1, 2, 0, 8), (4, 2, 0, 8), (8, 2, 0, 8))
    assert decode.shapes["position_ids"] == ((1, 1), (4, 1), (8, 1))
    assert decode.shapes["past_key_values.0.key"] == ((1, 2, 1, 8), (4, 2, 128, 8), (8, 2, 255, 8))
    assert decode.shapes["attention_mask"] == ((1, 2), (4, 129), (8, 256))
    assert plan.strongly_typed and plan.flags == ()
    assert any("float32" in n for n in plan.notes)  # says the engine will compute in fp32
    assert plan.memory["kv_cache"] == 2 * 2 * 2 * 8 * 4 * 256 * 8


def test_explicit_quantization_typing_and_flags(tiny, tmp_path):
    qdq = edit_graph(tiny, tmp_path / "qdq", add_qdq)
    plan = plan_trt(qdq, tmp_path / "eng", TrtOptions(gpu=get_gpu("h100-80g")))
    assert plan.strongly_typed and plan.flags == ()  # precision comes from the Q/DQ nodes
    assert plan.src.quantize_ops() == {"QuantizeLinear": 1, "DequantizeLinear": 1}
    weak = plan_trt(qdq, tmp_path / "eng", TrtOptions(gpu=get_gpu("h100-80g"), precision="fp16"))
    assert not weak.strongly_typed and weak.flags == ("FP16", "INT8")
    assert plan_trt(tiny, tmp_path / "eng", TrtOptions(gpu=get_gpu("h100-80g"), precision="fp16")).flags == ("FP16",)


def test_refusals(tiny, tmp_path):
    contrib = edit_graph(tiny, tmp_path / "contrib", add_contrib_op)
    with pytest.raises(SqDeployError, match="com.microsoft::Gelu"):
        plan_trt(contrib, tmp_path / "eng", TrtOptions(gpu=get_gpu("a100-80g")))
    with pytest.raises(SqDeployError, match="does not fit one a100-40g"):
        plan_trt(tiny, tmp_path / "eng", TrtOptions(gpu=get_gpu("a100-40g"), workspace_gib=40))
    with pytest.raises(SqDeployError, match="max_seq_len"):
        plan_trt(tiny, tmp_path / "eng", TrtOptions(gpu=get_gpu("a100-40g"), max_seq_len=100000))
    meta = json.loads((tiny / "sqdeploy-onnx.json").read_text())
    broken = edit_graph(tiny, tmp_path / "broken", lambda m: None)
    (broken / "sqdeploy-onnx.json").write_text(json.dumps({**meta, "num_kv_heads": 4}))
    with pytest.raises(SqDeployError, match="inconsistent"):
        plan_trt(broken, tmp_path / "eng", TrtOptions(gpu=get_gpu("a100-40g")))


def test_dry_run_cli_and_missing_tensorrt(tiny, tmp_path, capsys):
    assert build_main(["--engine", "tensorrt", str(tiny), "--out", str(tmp_path / "eng"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "profile context" in out and "profile decode" in out and "strongly typed" in out
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    plan = plan_trt(tiny, tmp_path / "eng", TrtOptions(gpu=get_gpu("a100-80g")))
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        build_trt(plan, tmp_path)
