"""Tensor parallelism behind the server's engine, on the CPU: two rank processes over gloo.

A TensorRT-LLM checkpoint exported at tp 2 is served through the same slot scheduler as
the single-GPU kernel backend; greedy tokens must equal the single-process reference (the
tp 1 export's kernel model, which equals the checkpoint's own PyTorch reference: see
test_tp_engine.py), batched or one at a time, through the Python API and over HTTP; a
cancelled request frees its slot, and no rank process outlives its engine or server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.trtllm.options import TrtllmOptions
from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
from sqdeploy.formats.trtllm.writer import write
from sqdeploy.kernels import greedy_generate
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.recipes import parse_recipe
from sqdeploy.runtime import BatchConfig, KernelOptions, SamplingParams, generate, open_engine, resolve_backend
from sqdeploy.runtime.backends.kernel import KernelConfig
from sqdeploy.runtime.backends.tp import TPBackend
from sqdeploy.runtime.batching import BatchingEngine
from sqdeploy.runtime.server.run import free_port
from sqdeploy.runtime.tp import build_rank_model
from tests.runtime.tp_model import tp_llama

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [100, 200, 300], [7] * 20, [42, 43, 44, 45, 46]]
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, calib_file):
    """{tp: TensorRT-LLM checkpoint} of one W8A8 Llama whose heads split over two ranks."""
    root = tmp_path_factory.mktemp("tpserve")
    model = tp_llama(root)
    scheme = {"weight": {"bits": 8, "granularity": "channel"}, "act": {"kind": "static_tensor"}}
    q = root / "q"
    quantize_to_dir(model, parse_recipe({"name": "w8a8", "scheme": scheme, "algorithm": "rtn"}), q,
                    Calibration(str(calib_file), 2, 32), Runtime(progress=False))
    out = {}
    for tp in (1, 2):
        out[tp] = root / f"tp{tp}"
        out[tp].mkdir()
        write(q, out[tp], TrtllmOptions(tp=tp), progress=False)
    return out


@pytest.fixture(scope="module")
def reference(checkpoints):
    """Single-process greedy tokens: the tp 1 checkpoint's kernel model."""
    model = build_rank_model(TrtllmCheckpoint(checkpoints[1]), 0, torch.device("cpu"), torch.float32)
    return {tuple(p): greedy_generate(model, [p], GREEDY.max_new_tokens)[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def backend(checkpoints):
    be = TPBackend(checkpoints[2], "cpu", KernelConfig(max_batch_size=4, max_prefill_tokens=7, max_model_len=64), tp=2)
    yield be
    be.close()


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_batched_and_single_greedy_equal_the_single_process_reference(backend, reference):
    assert backend.tp == 2 and backend.slots == 4 and len(backend.ranks.pids()) == 2
    engine = BatchingEngine(backend, BatchConfig(4, 7), close_backend=False)
    try:
        batched = [c.token_ids for c in generate(engine, PROMPTS, GREEDY)]
        single = [generate(engine, [p], GREEDY)[0].token_ids for p in PROMPTS]
        assert engine.scheduler.steps["prefill_chunks"] > 2 * len(PROMPTS)  # prompts over 7 tokens went in chunks
    finally:
        engine.shutdown()
    assert batched == single == [reference[tuple(p)] for p in PROMPTS]
    assert backend.free_slots() == 4 and backend.ranks.alive


def _count_calls(monkeypatch, obj, name: str) -> list:
    calls, real = [], getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a: calls.append(a) or real(*a))
    return calls


def test_greedy_steps_return_ids_and_sampled_rows_get_logits(backend, reference, monkeypatch):
    ids = _count_calls(monkeypatch, backend.ranks, "decode_greedy")
    logits = _count_calls(monkeypatch, backend.ranks, "decode")
    engine = BatchingEngine(backend, BatchConfig(4, 64), close_backend=False)
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    penalised = SamplingParams(max_new_tokens=6, repetition_penalty=1.3, ignore_eos=True)
    try:
        assert generate(engine, [PROMPTS[1]], GREEDY)[0].token_ids == reference[tuple(PROMPTS[1])]
        assert ids and not logits  # all rows greedy: only ids came back
        mixed = generate(engine, PROMPTS[:3], [GREEDY, sampled, penalised])
        again = generate(engine, [PROMPTS[1]], sampled)[0]
    finally:
        engine.shutdown()
    assert logits  # a sampled row: the logits came back
    assert mixed[0].token_ids == reference[tuple(PROMPTS[0])]  # its neighbours do not change a greedy row
    assert mixed[1].token_ids == again.token_ids  # a seeded row does not depend on its batch
    assert len(mixed[2].token_ids) == 6


def test_cancelled_request_frees_its_slot(backend, reference):
    from sqdeploy.runtime.engine import GenerationRequest, _QueueSink

    engine = BatchingEngine(backend, BatchConfig(4, 64), close_backend=False)
    try:
        sink = _QueueSink()
        (h,) = engine.submit([GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=50, ignore_eos=True))], sink)
        first = sink.q.get(timeout=60)
        assert first.token_id is not None and backend.free_slots() == 3
        h.cancel()
        while (e := sink.q.get(timeout=60)).finish_reason is None:
            pass
        assert e.finish_reason == "cancelled"
        # the slot is reused, by a request whose tokens are unaffected by what the slot held
        assert generate(engine, [PROMPTS[1]], GREEDY)[0].token_ids == reference[tuple(PROMPTS[1])]
    finally:
        engine.shutdown()
    assert backend.free_slots() == 4


def test_http_through_the_real_app_and_shutdown_stops_the_ranks(checkpoints, reference):
    from sqdeploy.runtime.server.limits import ServeLimits
    from sqdeploy.runtime.server.run import ServerThread

    before = _children()
    engine = open_engine(checkpoints[2], device="cpu", batch=BatchConfig(2, 16), name="tp",
                         kernel=KernelOptions(max_model_len=40))  # auto: tp for a tp-2 checkpoint
    ranks = set(engine.backend.ranks.pids())
    assert engine.info.backend == "tp" and ranks <= _children() - before
    limits = ServeLimits(max_prompt_tokens=32, max_new_tokens=32, max_concurrent=2, max_queue=4, request_timeout_s=60,
                         max_body_bytes=1 << 16)
    try:
        with ServerThread(engine, limits) as url:
            body = {"model": "tp", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert text == engine.tokenizer.decode(reference[tuple(PROMPTS[0])])
            v2 = httpx.post(f"{url}/v2/models/tp/generate", json={"text_input": "def f(x):", "parameters": {
                "max_tokens": 4, "temperature": 0}}, timeout=60)
            assert v2.status_code == 200, v2.text
            too_long = httpx.post(f"{url}/v1/completions", json={**body, "prompt": [5] * 30, "max_tokens": 30}, timeout=60)
            assert 400 <= too_long.status_code < 500
            m = httpx.get(f"{url}/metrics", timeout=10).text
            assert "sqdeploy" in m
            assert set(engine.backend.ranks.pids()) == ranks  # started once, for the engine's whole life
            # a rank that dies fails the request in flight and makes the replica not ready, never a hang
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            os.kill(max(ranks), signal.SIGKILL)
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code >= 500 and "rank" in r.text
            assert httpx.get(f"{url}/health", timeout=10).status_code == 503
            assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 503
    finally:
        engine.shutdown()
    assert not engine.backend.ranks.alive
    assert not any(_running(p) for p in ranks)


def test_sigterm_to_the_process_group_drains_then_stops_the_ranks(checkpoints):
    """As a service manager stops a service: SIGTERM to every process; the ranks must outlive the drain."""
    port = free_port()
    cmd = [sys.executable, "-m", "sqdeploy.cli.serve", str(checkpoints[2]), "--tp", "2", "--device", "cpu",
           "--port", str(port), "--model-name", "tp", "--max-model-len", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        ranks = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(ranks) >= 2
        body = {"model": "tp", "prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            next(lines)  # under way
            os.killpg(proc.pid, signal.SIGTERM)
            rest = [json.loads(x[5:]) for x in lines if x.startswith("data:") and x != "data: [DONE]"]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"  # drained to the end
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(_running(p) for p in ranks):
            assert time.monotonic() < deadline, "a rank outlived its server"
            time.sleep(0.2)
        assert "tp 2 over gloo" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ranks_exit_when_their_server_is_killed(checkpoints):
    """SIGKILL leaves the server no chance to stop its ranks: they notice and leave on their own."""
    script = ("import os, signal, sys\n"
              "from sqdeploy.runtime.tp import TPEngine\n"
              f"eng = TPEngine({str(checkpoints[2])!r}, device='cpu')\n"
              "print(*eng.pids(), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ranks = [int(p) for p in proc.stdout.split()]
    assert len(ranks) == 2
    deadline = time.monotonic() + 15
    while any(_running(p) for p in ranks):
        assert time.monotonic() < deadline, "a rank outlived its killed server"
        time.sleep(0.2)


def test_bad_requests_are_one_line_errors(checkpoints, tmp_path, capsys):
    from sqdeploy.cli.common import run_cli
    from sqdeploy.cli.serve import main

    with pytest.raises(SqDeployError, match="exported for tp 2, not --tp 4"):
        resolve_backend(checkpoints[2], "auto", "cpu", tp=4)
    with pytest.raises(SqDeployError, match="not one"):
        resolve_backend(tmp_path, "auto", "cpu", tp=2)
    assert resolve_backend(checkpoints[2], "auto", "cpu") == "tp"
    assert resolve_backend(checkpoints[1], "auto", "cpu") == "torch"  # tp 1: as before, unless --tp is given
    assert resolve_backend(checkpoints[1], "auto", "cpu", tp=1) == "tp"
    cases = [([str(checkpoints[2]), "--tp", "3", "--device", "cpu"], "not --tp 3"),
             ([str(tmp_path), "--tp", "2", "--device", "cpu"], "sq-export MODEL --target trtllm --tp N"),
             ([str(checkpoints[2]), "--tp", "2", "--backend", "onnxruntime"], "drop one of them"),
             ([str(checkpoints[2]), "--device", "cpu", "--kv-cache-gib", "1e-6"], "cannot hold one sequence")]
    if torch.cuda.device_count() < 2:
        cases.append(([str(checkpoints[2]), "--tp", "2", "--device", "cuda"], "needs 2 GPUs"))
    for argv, needle in cases:
        before = _children()
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert _children() <= before  # no rank was left behind


def test_offline_benchmark_with_tp(checkpoints):
    from sqdeploy.runtime.bench.offline import EngineSpec, OfflineGrid, run_variant

    r = run_variant(EngineSpec(str(checkpoints[2]), device="cpu", tp=2), OfflineGrid((2,), (8,), (4,), 1, 0))
    assert r["engine_backend"] == "tp" and r["rows"][0]["tokens_per_s"] > 0
