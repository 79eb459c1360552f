"""Triton repositories speak the TensorRT-LLM backend's own tensor names, so clients written for
NVIDIA's repositories work unchanged, and the ONNX repository is laid out for where it runs.

tests/data/tensorrtllm_backend_names.json is upstream's list (names and Triton types of the
``inflight_batcher_llm`` and ``llmapi`` models). A name upstream does not have is silently
ignored by the backend (e.g. a seed under another name: seeded requests would be unseeded),
so every input and output we declare must be upstream's, with upstream's type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sqdeploy.engines.triton import TritonOptions, check_repository, write_repository
from sqdeploy.engines.triton.schema import model_config_pb2, parse_pbtxt
from sqdeploy.testing.tiny_onnx import write_tiny_onnx_dir

UPSTREAM = json.loads((Path(__file__).resolve().parents[1] / "data" / "tensorrtllm_backend_names.json").read_text())["models"]


def _names(repo: Path, model: str) -> dict[str, dict[str, str]]:
    cfg = parse_pbtxt((repo / model / "config.pbtxt").read_text(), model)
    types = model_config_pb2().DataType
    return {"input": {t.name: types.Name(t.data_type) for t in cfg.input},
            "output": {t.name: types.Name(t.data_type) for t in cfg.output}}


def _assert_upstream(ours: dict[str, dict[str, str]], upstream_model: str, what: str) -> None:
    theirs = UPSTREAM[upstream_model]
    for kind in ("input", "output"):
        unknown = sorted(set(ours[kind]) - set(theirs[kind]))
        assert not unknown, f"{what}: {kind}s {unknown} are not {upstream_model} {kind}s upstream"
        wrong = {n: (t, theirs[kind][n]) for n, t in ours[kind].items() if theirs[kind][n] != t}
        assert not wrong, f"{what}: {kind} types differ from upstream (ours, theirs): {wrong}"


@pytest.fixture()
def engine_dir(tmp_path, shared_model):
    d = tmp_path / "engines"
    d.mkdir()
    cfg = {"pretrained_config": {"architecture": "LlamaForCausalLM", "mapping": {"world_size": 1}},
           "build_config": {"max_batch_size": 8, "plugin_config": {"use_paged_context_fmha": True}}}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "rank0.engine").write_bytes(b"\0")
    shutil.copy(shared_model / "tokenizer.json", d / "tokenizer.json")
    return d


def test_committed_upstream_list_has_the_sampling_names():
    """The list itself: the seed and min-tokens inputs under their current names (renamed upstream in 2025)."""
    llm, ens = UPSTREAM["tensorrt_llm"]["input"], UPSTREAM["ensemble"]["input"]
    assert llm["seed"] == ens["seed"] == "TYPE_UINT64" and "random_seed" not in llm
    assert {"runtime_top_k", "runtime_top_p", "temperature", "streaming", "end_id", "pad_id"} <= set(llm)


def test_tensorrt_llm_repository_uses_upstream_names(engine_dir, tmp_path):
    repo = tmp_path / "repo"
    write_repository(engine_dir, repo, TritonOptions())
    for model in ("ensemble", "tensorrt_llm", "preprocessing", "postprocessing"):
        _assert_upstream(_names(repo, model), model, model)
    llm = _names(repo, "tensorrt_llm")["input"]
    assert llm["seed"] == "TYPE_UINT64" and _names(repo, "ensemble")["input"]["seed"] == "TYPE_UINT64"


def test_llmapi_repository_uses_upstream_names(shared_model, tmp_path):
    repo = tmp_path / "repo"
    write_repository(shared_model, repo, TritonOptions())
    _assert_upstream(_names(repo, "tensorrt_llm"), "llmapi", "llmapi tensorrt_llm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_model):
    return write_tiny_onnx_dir(tmp_path_factory.mktemp("onnx") / "tiny", tokenizer_from=shared_model)


def test_onnx_generate_model_takes_the_ensembles_client_names(tiny, tmp_path):
    """A client of NVIDIA's ensemble (text_input, max_tokens, seed, stream ...) drives ``generate`` unchanged."""
    repo = tmp_path / "repo"
    write_repository(tiny, repo, TritonOptions())
    ours = _names(repo, "generate")
    _assert_upstream({"input": ours["input"], "output": ours["output"]}, "ensemble", "generate")


def test_onnx_repository_defaults_to_the_exports_device_copies_and_leaves_no_cache(tiny, tmp_path):
    repo = tmp_path / "repo"
    result = write_repository(tiny, repo, TritonOptions())
    cfg = parse_pbtxt((repo / "decoder" / "config.pbtxt").read_text(), "decoder")
    kind = model_config_pb2().ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind)
    assert (result["device"], kind) == ("cpu", "KIND_CPU")  # a float32 export is the CPU form
    gpu = write_repository(tiny, tmp_path / "gpu", TritonOptions(device="gpu"))
    assert gpu["device"] == "gpu"
    copied, source = repo / "decoder" / "1" / "model.onnx", tiny / "model.onnx"
    assert copied.read_bytes() == source.read_bytes() and copied.stat().st_ino != source.stat().st_ino
    assert not list(repo.rglob("__pycache__"))
    assert "export PYTHONDONTWRITEBYTECODE=1" in (repo / "launch.sh").read_text()
    (repo / "generate" / "1" / "__pycache__").mkdir()
    failed = [f for f in check_repository(repo) if not f.ok]
    assert [f.check for f in failed] == ["no __pycache__"]
