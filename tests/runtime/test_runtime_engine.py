"""The generation engine: continuous batching computes what each sequence computes alone, on every backend."""

from __future__ import annotations

import time

import pytest

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.formats.readers import open_model
from sqdeploy.model.generate import greedy_generate
from sqdeploy.runtime import BatchConfig, InvalidRequestError, SamplingParams, generate, open_engine, resolve_backend, stream
from tests.runtime_support import shared_onnx, tiny_onnx, tiny_w8a8

PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\ndef mean(x",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push",
    "for i in range(10):",
    "x = [",
    "def add(a, b):\n    return",
]
_REFERENCE: dict = {}


def reference_tokens(model_dir, tokenizer, prompts, n):
    """Greedy tokens of the reference model, one prompt at a time (no batching, no padding)."""
    key = (str(model_dir), tuple(prompts), n)
    if key not in _REFERENCE:
        model = open_model(model_dir).model
        _REFERENCE[key] = [greedy_generate(model, tokenizer(p).input_ids, n, eos_ids={tokenizer.eos_token_id}) for p in prompts]
    return _REFERENCE[key]


def check_batched_equals_alone(engine, reference_dir, new_tokens=12):
    """More prompts than slots, different lengths and budgets: rows join and leave the batch mid-flight."""
    budgets = [new_tokens - 3 * (i % 3) for i in range(len(PROMPTS))]
    outs = generate(engine, PROMPTS, [SamplingParams(max_new_tokens=b) for b in budgets])
    refs = reference_tokens(reference_dir, engine.tokenizer, PROMPTS, new_tokens)
    for out, ref, budget in zip(outs, refs, budgets):
        assert out.token_ids == ref[:budget]
        assert out.finish_reason == ("length" if len(ref) >= budget else "stop")
        assert out.text == engine.tokenizer.decode(out.token_ids)


def test_torch_backend_batching_matches_greedy_reference(tmp_path_factory, shared_model):
    reference = shared_onnx(tmp_path_factory, shared_model) / "quantized"  # the export's own reference weights
    engine = open_engine(reference, "torch", batch=BatchConfig(max_batch_size=2))
    try:
        check_batched_equals_alone(engine, reference)
    finally:
        engine.shutdown()


def test_onnxruntime_fp32_export_matches_torch_reference_exactly(tmp_path_factory, shared_model):
    onnx_dir = shared_onnx(tmp_path_factory, shared_model)
    assert resolve_backend(onnx_dir) == "onnxruntime"
    engine = open_engine(onnx_dir, batch=BatchConfig(max_batch_size=2))
    try:
        assert engine.info.backend == "onnxruntime"
        check_batched_equals_alone(engine, onnx_dir / "quantized")
    finally:
        engine.shutdown()


def test_onnxruntime_w8a8_matches_torch_backend_on_same_quantized_model(tmp_path_factory, tiny_models, calib_file):
    qdir, onnx_dir = tiny_w8a8(tmp_path_factory, tiny_models, calib_file)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ort = open_engine(onnx_dir, batch=BatchConfig(max_batch_size=4), exact=True)
    ref = open_engine(qdir, "torch", batch=BatchConfig(max_batch_size=4))
    try:
        got = [c.token_ids for c in generate(ort, PROMPTS, params)]
        want = [c.token_ids for c in generate(ref, PROMPTS, params)]
        assert got == want
    finally:
        ort.shutdown()
        ref.shutdown()


def test_streaming_seeded_sampling_and_stop(tiny_models):
    engine = open_engine(tiny_models["llama"], batch=BatchConfig(max_batch_size=2))
    try:
        p = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7)
        events = list(stream(engine, PROMPTS[0], p))
        final = events[-1].completion
        assert final.finish_reason == "length" and len(final.token_ids) == 10
        assert "".join(e.text for e in events) == final.text
        assert [e.token_id for e in events] == final.token_ids
        # the same seed gives the same tokens, whatever shares the batch
        again = generate(engine, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [SamplingParams(max_new_tokens=10, seed=1), p, p])
        assert again[1].token_ids == final.token_ids
        # a stop string ends the text just before it, and is never streamed
        greedy = generate(engine, [PROMPTS[0]], SamplingParams(max_new_tokens=10))[0].text
        stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
        events = list(stream(engine, PROMPTS[0], SamplingParams(max_new_tokens=10, stop=(stop,))))
        assert events[-1].finish_reason == "stop"
        assert "".join(e.text for e in events) == greedy[: greedy.index(stop)]
        assert events[-1].completion.timings.ttft > 0
    finally:
        engine.shutdown()


def test_slots_are_freed_and_cancelled_requests_leave(tiny_models):
    engine = open_engine(tiny_models["llama"], batch=BatchConfig(max_batch_size=2))
    try:
        long = stream(engine, PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True))
        next(long)
        long.close()  # closing the stream cancels the request
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats() == {"waiting": 0, "running": 0}
        assert engine.scheduler.batch is None  # the cache went with the last row
        outs = generate(engine, PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert all(len(o.token_ids) == 3 for o in outs)
    finally:
        engine.shutdown()


def test_one_sink_call_per_step_for_requests_of_one_server(tiny_models):
    """A server passes ``bridge.sink``, a new bound-method object on every read: the engine still makes one
    call per step for all of its rows (one wake-up of the event loop), with every event delivered in order."""
    import threading

    from sqdeploy.runtime.engine import GenerationRequest

    class _Server:
        def __init__(self):
            self.calls: list[list] = []
            self.done = threading.Event()

        def sink(self, events):
            self.calls.append([(e.request_id, e.finish_reason) for e in events])
            if sum(f is not None for c in self.calls for _, f in c) == 4:
                self.done.set()

    server = _Server()
    engine = open_engine(tiny_models["llama"], batch=BatchConfig(max_batch_size=4))
    try:
        ids = engine.tokenizer(PROMPTS[0]).input_ids
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        for _ in range(4):  # four HTTP requests: four reads of server.sink
            engine.submit([GenerationRequest(ids, params)], server.sink)
        assert server.done.wait(60)
    finally:
        engine.shutdown()
    assert max(len({rid for rid, _ in c}) for c in server.calls) == 4  # a step of all four rows: one call
    assert len(server.calls) <= 12  # one per step (6 tokens, admissions perhaps apart); one per row and step: 24
    per_request = {}
    for c in server.calls:
        for rid, _ in c:
            per_request[rid] = per_request.get(rid, 0) + 1
    assert sorted(per_request.values()) == [6] * 4

def test_activity_counts_the_workers_steps_and_tokens(tiny_models):
    engine = open_engine(tiny_models["llama"], batch=BatchConfig(max_batch_size=4))
    try:
        before = engine.activity()
        outs = generate(engine, PROMPTS[:3], SamplingParams(max_new_tokens=5, ignore_eos=True))
        after = engine.activity()
    finally:
        engine.shutdown()
    assert after["tokens"] - before["tokens"] == sum(len(o.token_ids) for o in outs) == 15
    assert after["steps"] - before["steps"] >= 4 and after["step_s"] > before["step_s"]  # a prefill step gives a first token


def test_requests_are_validated(tiny_models):
    engine = open_engine(tiny_models["llama"], "torch")
    try:
        with pytest.raises(InvalidRequestError, match="context"):
            generate(engine, ["x " * 300], SamplingParams(max_new_tokens=10))
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            generate(engine, [[1, 2, 10**6]], SamplingParams())
        for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(stop=("",))):
            with pytest.raises(InvalidRequestError):
                SamplingParams(**bad)
    finally:
        engine.shutdown()


def test_backend_errors_are_one_line_with_a_remedy(tmp_path, tiny_models):
    with pytest.raises(SqDeployError, match="not an ONNX export"):
        open_engine(tiny_models["llama"], "onnxruntime")
    with pytest.raises(SqDeployError, match="unknown backend"):
        open_engine(tiny_models["llama"], "tensorflow")
    with pytest.raises(SqDeployError, match="does not exist"):
        open_engine(tmp_path / "nothing")
    with pytest.raises(SqDeployError, match="not a TensorRT-LLM engine"):
        open_engine(tiny_models["llama"], "trtllm")
    (tmp_path / "config.json").write_text('{"pretrained_config": {"vocab_size": 8}, "build_config": {"max_seq_len": 8}}')
    (tmp_path / "rank0.engine").write_bytes(b"")
    assert resolve_backend(tmp_path) == "trtllm"
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="tensorrt_llm"):
            open_engine(tmp_path)


def test_onnxruntime_engine_directory_uses_its_session_settings(tmp_path_factory, tiny_models, tmp_path):
    from sqdeploy.cli.build import main as build_main

    export = tiny_onnx(tmp_path_factory, tiny_models)
    built = tmp_path / "engine"
    assert build_main([str(export), "--engine", "onnxruntime", "--out", str(built), "--intra-op-threads", "1"]) in (0, None)
    engine = open_engine(built, batch=BatchConfig(max_batch_size=2))
    plain = open_engine(export, batch=BatchConfig(max_batch_size=2))
    try:
        settings = engine.backend.settings
        assert settings.prebuilt and settings.intra_op_num_threads == 1
        assert engine.info.description.startswith("ONNX Runtime engine")
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        assert [c.token_ids for c in generate(engine, PROMPTS[:3], params)] == [c.token_ids for c in generate(plain, PROMPTS[:3], params)]
    finally:
        engine.shutdown()
        plain.shutdown()
