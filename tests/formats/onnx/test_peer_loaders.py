"""ONNX exports open in the ecosystem's own loaders: Optimum's ``ORTModelForCausalLM`` and ONNX
Runtime GenAI's ``og.Model``.

The schema tests always run: ``genai_config.json`` uses only keys GenAI's configuration reference
documents (tests/data/genai_config_keys.json), its name templates resolve to the graph's real
inputs and outputs, and ``config.json`` / ``generation_config.json`` load with transformers.

The generation tests drive the real tools in their own virtual environments (Optimum pins an
older transformers than sq-deploy's): build them with ``tools/peer_envs.sh`` and point
``SQDEPLOY_OPTIMUM_PYTHON`` / ``SQDEPLOY_GENAI_PYTHON`` at their python; without them the tests
skip and say so. They compare greedy tokens with sq-deploy's own decoder (``OnnxDecoder``) on the
shared model (a trained model: its argmax is decisive, unlike a random one's), Optimum on one
left-padded batch, GenAI prompt by prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import onnx
import pytest

from sqdeploy.formats.onnx.companions import COMPANIONS, GENAI_CONFIG
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir

ROOT = Path(__file__).resolve().parents[3]
KEYS = json.loads((ROOT / "tests" / "data" / "genai_config_keys.json").read_text())
PEER_SCRIPT = ROOT / "tools" / "peer_generate.py"


def _export(qdir: Path, out: Path, *flags: str) -> Path:
    from sqdeploy.cli.export import main

    assert main([str(qdir), "--target", "onnx", "--out", str(out), "--quiet", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_exports(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peers-tiny")
    out = {}
    for fam in ("llama", "opt"):
        q, _ = quantize_to_dir(tiny_models[fam], "fp16", root / f"q-{fam}", Calibration(), Runtime(progress=False))
        out[f"{fam}-tensorrt"] = _export(q, root / f"{fam}-tensorrt", "--dtype", "float32")
    out["llama-onnxruntime"] = _export(root / "q-llama", root / "llama-onnxruntime", "--dtype", "float32",
                                       "--onnx-variant", "onnxruntime")
    return out


def _check_keys(section: dict, allowed: list[str], where: str) -> None:
    unknown = set(section) - set(allowed)
    assert not unknown, f"{where}: keys {sorted(unknown)} are not in GenAI's documented schema"


@pytest.mark.parametrize("form", ["llama-tensorrt", "llama-onnxruntime", "opt-tensorrt"])
def test_genai_config_follows_the_documented_schema_and_the_graph(form, tiny_exports):
    path = tiny_exports[form]
    cfg = json.loads((path / GENAI_CONFIG).read_text())
    meta = json.loads((path / "sqdeploy-onnx.json").read_text())
    _check_keys(cfg, KEYS["top"], "top level")
    model, search = cfg["model"], cfg["search"]
    _check_keys(model, KEYS["model"], "model")
    assert set(KEYS["model_required"]) <= set(model)
    dec = model["decoder"]
    _check_keys(dec, KEYS["decoder"], "model.decoder")
    assert set(KEYS["decoder_required"]) <= set(dec)
    _check_keys(dec["inputs"], KEYS["inputs"], "model.decoder.inputs")
    _check_keys(dec["outputs"], KEYS["outputs"], "model.decoder.outputs")
    _check_keys(dec["session_options"], KEYS["session_options"], "model.decoder.session_options")
    _check_keys(search, KEYS["search"], "search")

    graph = onnx.load(str(path / dec["filename"]), load_external_data=False).graph
    graph_in, graph_out = [i.name for i in graph.input], [o.name for o in graph.output]
    n = dec["num_hidden_layers"]
    named_in = [v for k, v in dec["inputs"].items() if not k.endswith("_names")]
    expanded_in = named_in + [dec["inputs"][k] % i for i in range(n) for k in ("past_key_names", "past_value_names")]
    assert sorted(expanded_in) == sorted(graph_in)
    expanded_out = [dec["outputs"]["logits"]] + [dec["outputs"][k] % i for i in range(n)
                                                 for k in ("present_key_names", "present_value_names")]
    assert sorted(expanded_out) == sorted(graph_out)
    kv = next(i for i in graph.input if i.name == dec["inputs"]["past_key_names"] % 0).type.tensor_type.shape.dim
    assert (kv[1].dim_value, kv[3].dim_value) == (dec["num_key_value_heads"], dec["head_size"])
    assert (dec["num_attention_heads"], dec["hidden_size"]) == (meta["num_heads"], meta["hidden_size"])
    assert model["vocab_size"] == meta["vocab_size"]
    assert model["context_length"] == search["max_length"] == meta["max_positions"]
    assert model["eos_token_id"] == meta["eos_token_id"]
    assert search["do_sample"] is False and search["top_k"] == 1
    assert search["past_present_share_buffer"] is (meta["variant"] == "onnxruntime")


def test_config_json_and_generation_config_load_with_transformers(tiny_exports):
    from transformers import AutoConfig, GenerationConfig

    for form, path in tiny_exports.items():
        cfg = AutoConfig.from_pretrained(path)
        meta = json.loads((path / "sqdeploy-onnx.json").read_text())
        assert cfg.architectures == [meta["architecture"]] and cfg.num_hidden_layers == meta["num_layers"]
        assert getattr(cfg, "quantization_config", None) is None  # the graph is not a compressed-tensors model
        gen = GenerationConfig.from_pretrained(path)
        assert gen.eos_token_id == meta["eos_token_id"]


def test_onnxruntime_engine_keeps_the_loader_files(tiny_exports, tmp_path):
    from sqdeploy.cli.build import main as build_main

    out = tmp_path / "engine"
    assert build_main(["--engine", "onnxruntime", str(tiny_exports["llama-onnxruntime"]), "--out", str(out)]) == 0
    for name in COMPANIONS:
        assert (out / name).read_bytes() == (tiny_exports["llama-onnxruntime"] / name).read_bytes()


# ---------------------------------------------------------------- the real tools, in their own environments

FORMS = {  # form -> (recipe, export flags): the forms the README documents
    "fp32": ("fp16", ["--dtype", "float32"]),
    "fp32-onnxruntime": ("fp16", ["--dtype", "float32", "--onnx-variant", "onnxruntime"]),
    "fp16": ("fp16", ["--dtype", "float16"]),
    "w8a8-static": ("w8a8-sq-o3", ["--dtype", "float32"]),
    "w8a8-per-token": ("w8a8-sq-o1", ["--dtype", "float32", "--onnx-variant", "onnxruntime"]),
    "w4a16-matmulnbits": ("w4a16-rtn", ["--dtype", "float32", "--onnx-variant", "onnxruntime"]),
}
PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n\ndef main():\n    args = sys.argv[1:]\n", "class Stack:\n"]
NEW_TOKENS = 16


def _peer_python(var: str) -> str:
    py = os.environ.get(var)
    if not py:
        pytest.skip(f"{var} is not set: build the peer environments with tools/peer_envs.sh and export {var}")
    if not os.access(py, os.X_OK):
        pytest.skip(f"{var}={py} is not an executable python")
    return py


@pytest.fixture(scope="module")
def shared_exports(shared_model, tmp_path_factory):
    if not (os.environ.get("SQDEPLOY_OPTIMUM_PYTHON") or os.environ.get("SQDEPLOY_GENAI_PYTHON")):
        pytest.skip("no peer environment configured (SQDEPLOY_OPTIMUM_PYTHON / SQDEPLOY_GENAI_PYTHON; tools/peer_envs.sh)")
    root = tmp_path_factory.mktemp("peers-shared")
    calib = Calibration(str(shared_model.parents[1] / "data" / "humaneval.jsonl.gz"), samples=4, seq_len=128)
    qdirs, out = {}, {}
    for form, (recipe, flags) in FORMS.items():
        if recipe not in qdirs:
            qdirs[recipe], _ = quantize_to_dir(shared_model, recipe, root / f"q-{recipe}", calib, Runtime(progress=False))
        out[form] = _export(qdirs[recipe], root / form, *flags)
    return out


def _prompt_ids(path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [tok(p)["input_ids"] for p in PROMPTS]


def _ours(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from sqdeploy.formats.onnx.session import OnnxDecoder

    dec = OnnxDecoder(path)
    eos = dec.meta["eos_token_id"]
    eos = set(eos) if isinstance(eos, list) else {eos}
    out = []
    for p in prompts:
        tokens = dec.greedy(p, NEW_TOKENS)
        cut = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
        out.append(tokens[:cut])
    return out


def _peer(python: str, tool: str, path: Path, prompts: list[list[int]]) -> list[list[int]]:
    run = subprocess.run([python, str(PEER_SCRIPT), tool, str(path), "--prompts", json.dumps(prompts),
                          "--max-new-tokens", str(NEW_TOKENS)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, f"{tool} failed on {path}:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tool,var", [("optimum", "SQDEPLOY_OPTIMUM_PYTHON"), ("genai", "SQDEPLOY_GENAI_PYTHON")])
@pytest.mark.parametrize("form", list(FORMS))
def test_peer_generates_the_same_greedy_tokens(tool, var, form, shared_exports):
    python = _peer_python(var)
    path = shared_exports[form]
    prompts = _prompt_ids(path)
    assert len({len(p) for p in prompts}) > 1  # Optimum's batch is left-padded
    assert _peer(python, tool, path, prompts) == _ours(path, prompts)
