"""The Python-backend models sq-build writes, run here against a stand-in for Triton's pb_utils.

``triton_python_backend_utils`` exists only inside Triton; the stand-in below has the
few calls the models use (tensors, requests, response senders, BLS requests), and its
BLS requests run the repository's own ONNX decoder in ONNX Runtime.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from sqdeploy.engines.triton import TritonOptions, write_repository
from sqdeploy.engines.triton.common import PYTHON_MODELS
from sqdeploy.engines.triton.schema import parse_pbtxt
from sqdeploy.testing.tiny_onnx import write_tiny_onnx_dir


class Tensor:
    def __init__(self, name, data):
        self._name, self._data = name, np.asarray(data)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._data


class Response:
    def __init__(self, output_tensors=None, error=None):
        self.tensors, self.err = output_tensors or [], error

    def has_error(self):
        return self.err is not None

    def error(self):
        return self.err

    def output_tensors(self):
        return self.tensors


class Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))


class Request:
    def __init__(self, **arrays):
        self.tensors = {k: Tensor(k, v) for k, v in arrays.items()}
        self.sender = Sender()

    def get_response_sender(self):
        return self.sender


def make_pb_utils(models):
    """A stand-in module; ``models`` maps a model name to a function of its input arrays."""

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names, preferred_memory=None):
            self.model, self.inputs, self.names = model_name, inputs, requested_output_names

        def exec(self):
            out = models[self.model]({t.name(): t.as_numpy() for t in self.inputs}, self.names)
            return Response([Tensor(k, v) for k, v in out.items()])

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.InferenceRequest, m.TritonError = Tensor, Response, InferenceRequest, TritonError
    m.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    m.PreferredMemory = lambda kind, device: (kind, device)
    m.TRITONSERVER_MEMORY_CPU, m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 0, 1
    return m


def load_model(repo, name, pb_utils, monkeypatch):
    version = repo / name / "1"
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    monkeypatch.syspath_prepend(str(version))
    monkeypatch.delitem(sys.modules, "sqdeploy_triton", raising=False)
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(parse_pbtxt((repo / name / "config.pbtxt").read_text()), preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name), "model_version": "1"})
    return model


@pytest.mark.parametrize("path", sorted(PYTHON_MODELS.glob("*.py")), ids=lambda p: p.name)
def test_python_models_parse_and_are_documented(path):
    tree = ast.parse(path.read_text(), str(path))
    assert ast.get_docstring(tree), f"{path.name} needs a module docstring"
    assert len(path.read_text().splitlines()) < 130


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_model):
    return write_tiny_onnx_dir(tmp_path_factory.mktemp("onnx") / "tiny", tokenizer_from=shared_model)


def reference_greedy(graph, ids, n, eos):
    """Greedy decoding by full recomputation (no KV cache): what generate must reproduce."""
    session = ort.InferenceSession(str(graph))
    ids = list(ids)
    out = []
    for _ in range(n):
        x = np.array([ids], dtype=np.int64)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(len(ids))[None]}
        for i in range(2):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, 2, 0, 8), np.float32)
        token = int(np.argmax(session.run(["logits"], feeds)[0][0, -1]))
        if token in eos:
            break
        out.append(token)
        ids.append(token)
    return out


def test_onnx_generate_with_kv_cache(tiny, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_repository(tiny, repo, TritonOptions(device="cpu"))
    decoder = ort.InferenceSession(str(repo / "decoder" / "1" / "model.onnx"))
    pb = make_pb_utils({"decoder": lambda inputs, names: dict(zip(names, decoder.run(names, inputs)))})
    model = load_model(repo, "generate", pb, monkeypatch)
    tok = model.tokenizer
    prompt = "def fibonacci(n):"
    expected = tok.decode(reference_greedy(tiny / "model.onnx", tok.encode(prompt), 12, model.eos), skip_special_tokens=True)
    request = Request(text_input=np.array([prompt.encode()], dtype=object), max_tokens=np.array([12], np.int32))
    assert model.execute([request]) is None
    (response, flags), = request.sender.sent
    assert flags == 1 and response.tensors[0].as_numpy()[0].decode() == expected
    streamed = Request(text_input=np.array([prompt.encode()], dtype=object), max_tokens=np.array([12], np.int32),
                       stream=np.array([True]))
    model.execute([streamed])
    pieces = [r.tensors[0].as_numpy()[0].decode() for r, _ in streamed.sender.sent if r is not None]
    assert "".join(pieces) == expected and streamed.sender.sent[-1][1] == 1 and len(pieces) > 1
    bad = Request(text_input=np.array([prompt.encode()], dtype=object))
    pb.InferenceRequest.exec = lambda self: Response(error=pb.TritonError("decoder unavailable"))
    model.execute([bad])
    (response, flags), = bad.sender.sent
    assert response.err.message() == "decoder unavailable" and flags == 1


def test_trtllm_pre_and_postprocessing(shared_model, tmp_path, monkeypatch):
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": {"world_size": 1}},
                                                     "build_config": {"max_batch_size": 4}}))
    (engines / "rank0.engine").write_bytes(b"\0")
    repo = tmp_path / "repo"
    write_repository(engines, repo, TritonOptions(tokenizer=shared_model))
    pb = make_pb_utils({})
    pre = load_model(repo, "preprocessing", pb, monkeypatch)
    post = load_model(repo, "postprocessing", pb, monkeypatch)
    tok = pre.tokenizer
    queries = ["def add(a, b):", "x = 1"]
    (response,) = pre.execute([Request(QUERY=np.array([[q.encode()] for q in queries], dtype=object),
                                       REQUEST_OUTPUT_LEN=np.array([[16], [16]], np.int32))])
    out = {t.name(): t.as_numpy() for t in response.tensors}
    ids = [tok.encode(q) for q in queries]
    assert out["REQUEST_INPUT_LEN"].tolist() == [[len(x)] for x in ids]
    assert out["INPUT_ID"][0, : len(ids[0])].tolist() == ids[0] and out["INPUT_ID"].dtype == np.int32
    assert out["OUT_END_ID"].tolist() == [[tok.eos_token_id]] * 2
    (response,) = post.execute([Request(TOKENS_BATCH=out["INPUT_ID"][:, None, :], SEQUENCE_LENGTH=out["REQUEST_INPUT_LEN"])])
    texts = response.tensors[0].as_numpy()
    assert [t[0].decode() for t in texts] == [tok.decode(x, skip_special_tokens=True) for x in ids]
