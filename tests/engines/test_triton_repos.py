"""sq-build --triton: every repository layout, parsed with Triton's ModelConfig protobuf and checked."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from sqdeploy.cli.build import main as build_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.engines.triton import TritonOptions, check_repository, write_repository
from sqdeploy.engines.triton.schema import model_config_pb2, parse_pbtxt
from sqdeploy.formats.onnx.contract import OnnxExport
from sqdeploy.testing.tiny_onnx import write_tiny_onnx_dir


def load(repo, model):
    return parse_pbtxt((repo / model / "config.pbtxt").read_text(), model)


def params(cfg):
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_model):
    return write_tiny_onnx_dir(tmp_path_factory.mktemp("onnx") / "tiny", tokenizer_from=shared_model)


@pytest.fixture()
def engine_dir(tmp_path, shared_model):
    """What trtllm-build leaves (config.json + one engine per rank) plus the tokenizer copied by sq-build."""
    d = tmp_path / "engines"
    d.mkdir()
    cfg = {"version": "1.2.1", "pretrained_config": {"architecture": "LlamaForCausalLM", "dtype": "float16",
                                                     "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}},
           "build_config": {"max_batch_size": 32, "max_input_len": 512, "max_seq_len": 1024,
                            "plugin_config": {"use_paged_context_fmha": False}}}
    (d / "config.json").write_text(json.dumps(cfg))
    for r in range(2):
        (d / f"rank{r}.engine").write_bytes(b"\0")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_model / f, d / f)
    return d


def test_trtllm_engine_repository(engine_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert build_main(["--triton", str(engine_dir), "--out", str(repo), "--kv-cache-fraction", "0.85"]) == 0
    out = capsys.readouterr().out
    assert "mpirun --allow-run-as-root" in out and "generate_stream" in out
    assert sorted(p.name for p in repo.iterdir()) == [".sqdeploy-output.json", "ensemble", "launch.sh", "postprocessing", "preprocessing", "tensorrt_llm"]
    llm = load(repo, "tensorrt_llm")
    p = params(llm)
    assert llm.backend == "tensorrtllm" and llm.max_batch_size == 32 and llm.model_transaction_policy.decoupled
    assert p["gpt_model_type"] == "inflight_fused_batching" and p["gpt_model_path"] == str(engine_dir.resolve())
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.85" and p["enable_chunked_context"] == "false"  # engine without paged context FMHA
    types = model_config_pb2().DataType
    assert {t.name: types.Name(t.data_type) for t in llm.input}["input_ids"] == "TYPE_INT32"
    assert [s.model_name for s in load(repo, "ensemble").ensemble_scheduling.step] == ["preprocessing", "tensorrt_llm", "postprocessing"]
    for model in ("preprocessing", "postprocessing"):
        assert (repo / model / "1" / "tokenizer" / "tokenizer.json").exists() and params(load(repo, model))["tokenizer_dir"] == "tokenizer"
    text = "".join((repo / m / "config.pbtxt").read_text() for m in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing"))
    assert "${" not in text
    launch = (repo / "launch.sh").read_text()
    assert launch.count("-n 1 tritonserver") == 2 and "--load-model=tensorrt_llm" in launch
    assert all(f.ok for f in check_repository(repo))


def test_checker_catches_broken_wiring(engine_dir, tmp_path):
    repo = tmp_path / "repo"
    write_repository(engine_dir, repo, TritonOptions())
    ens = repo / "ensemble" / "config.pbtxt"
    ens.write_text(ens.read_text().replace('key: "input_lengths"', 'key: "input_length"'))
    post = repo / "postprocessing" / "config.pbtxt"
    post.write_text(post.read_text().replace("TYPE_INT32", "TYPE_INT64", 1))
    pre = repo / "preprocessing" / "config.pbtxt"
    pre.write_text(pre.read_text().replace("max_batch_size: 32", "max_batch_size: ${triton_max_batch_size}"))
    failed = {(f.model, f.check): f.detail for f in check_repository(repo) if not f.ok}
    assert "input_length is not an input of tensorrt_llm" in failed[("ensemble", "step tensorrt_llm")]
    assert "required input input_lengths is not mapped" in failed[("ensemble", "step tensorrt_llm")]
    assert "type/shape differ" in failed[("ensemble", "step postprocessing")]
    assert "does not parse" in failed[("preprocessing", "parses as ModelConfig")]


def test_trtllm_bad_input(engine_dir, tmp_path, shared_model):
    with pytest.raises(SqDeployError, match="exceeds the engines' max_batch_size 32"):
        write_repository(engine_dir, tmp_path / "a", TritonOptions(max_batch_size=64))
    (engine_dir / "rank1.engine").unlink()
    with pytest.raises(SqDeployError, match="lacks rank1.engine"):
        write_repository(engine_dir, tmp_path / "b", TritonOptions())
    (engine_dir / "rank1.engine").write_bytes(b"\0")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (engine_dir / f).unlink()
    with pytest.raises(SqDeployError, match="no tokenizer files"):
        write_repository(engine_dir, tmp_path / "c", TritonOptions())
    assert not any((tmp_path / n).exists() for n in "abc")
    write_repository(engine_dir, tmp_path / "d", TritonOptions(tokenizer=shared_model))


def test_onnx_repository_matches_the_graph(tiny, tmp_path):
    repo = tmp_path / "repo"
    result = write_repository(tiny, repo, TritonOptions(device="cpu"))
    assert result["entry_model"] == "generate" and result["launch"] == f"tritonserver --model-repository={repo.resolve()}"
    dec, src = load(repo, "decoder"), OnnxExport(tiny)
    types = model_config_pb2().DataType
    got = [(t.name, types.Name(t.data_type), list(t.dims)) for t in dec.input]
    assert got[0] == ("input_ids", "TYPE_INT64", [-1, -1]) and len(got) == len(src.inputs) == 3 + 2 * 2
    assert ("past_key_values.1.value", "TYPE_FP32", [-1, 2, -1, 8]) in got
    assert [t.name for t in dec.output] == [s.name for s in src.outputs]
    assert dec.backend == "onnxruntime" and dec.max_batch_size == 0
    gen = params(load(repo, "generate"))
    assert (gen["num_layers"], gen["num_kv_heads"], gen["head_dim"], gen["kv_dtype"]) == ("2", "2", "8", "float32")
    assert (repo / "decoder" / "1" / "model.onnx.data").exists() and (repo / "generate" / "1" / "sqdeploy_triton.py").exists()
    cfg = repo / "decoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("TYPE_FP32", "TYPE_FP16", 1))
    assert [f.detail for f in check_repository(repo) if not f.ok] == ["past_key_values.0.key"]


def test_onnx_runtime_engine_repository(tiny, tmp_path):
    engine = tmp_path / "engine"
    assert build_main(["--engine", "onnxruntime", str(tiny), "--out", str(engine)]) == 0
    with pytest.raises(SqDeployError, match="optimised for CPUExecutionProvider"):
        write_repository(engine, tmp_path / "gpu", TritonOptions(device="gpu"))
    write_repository(engine, tmp_path / "repo", TritonOptions(device="cpu"))
    dec = load(tmp_path / "repo", "decoder")
    assert dec.optimization.graph.level == 2  # already optimised offline
    assert all(f.ok for f in check_repository(tmp_path / "repo"))


def test_llmapi_repository(shared_model, tmp_path):
    repo = tmp_path / "repo"
    result = write_repository(shared_model, repo, TritonOptions(streaming=False, kv_cache_fraction=0.8), tp=2)
    assert result["kind"] == "trtllm-hf"
    cfg = load(repo, "tensorrt_llm")
    assert cfg.backend == "python" and not cfg.model_transaction_policy.decoupled
    assert {t.name for t in cfg.input} >= {"text_input", "streaming", "sampling_param_max_tokens", "sampling_param_temperature"}
    settings = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert settings["model"] == str(shared_model.resolve()) and settings["backend"] == "pytorch"
    assert settings["tensor_parallel_size"] == 2 and settings["kv_cache_config"] == {"free_gpu_memory_fraction": 0.8}
    assert all(f.ok for f in check_repository(repo))


def test_sources_that_are_not_servable(tmp_path, shared_model):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "rank0.safetensors").write_bytes(b"")
    with pytest.raises(SqDeployError, match="build it first: sq-build --engine trtllm"):
        write_repository(ckpt, tmp_path / "r", TritonOptions())
    qdir = tmp_path / "q"
    shutil.copytree(shared_model, qdir)
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(SqDeployError, match="--target trtllm-hf"):
        write_repository(qdir, tmp_path / "r", TritonOptions())
