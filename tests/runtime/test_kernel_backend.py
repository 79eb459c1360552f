"""The kernel backend behind the engine, on the CPU (the kernel model's exact PyTorch arithmetic).

Greedy tokens of a batch equal those of each prompt alone, chunked prefill interleaves
with decoding, and slots come and go with their requests.
"""

from __future__ import annotations

import pytest
import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.model.generate import greedy_generate
from sqdeploy.runtime import BatchConfig, KernelOptions, SamplingParams, generate, open_engine, resolve_backend
from sqdeploy.runtime.backends.kernel import KernelBackend, KernelConfig
from sqdeploy.runtime.batching import BatchingEngine
from sqdeploy.runtime.engine import GenerationRequest
from sqdeploy.runtime.sequence import Sequence
from sqdeploy.runtime.slot_batching import SlotScheduler, plan_chunks

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [100, 200, 300], [7] * 20, [42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def backend(tiny_models):
    return KernelBackend(tiny_models["llama"], "cpu", KernelConfig(max_batch_size=4, max_prefill_tokens=7))


def test_plan_chunks():
    assert plan_chunks([10, 3, 5], 7) == [7, 0, 0]
    assert plan_chunks([2, 3, 5], 7) == [2, 3, 2]


def test_batched_greedy_equals_one_at_a_time(backend):
    engine = BatchingEngine(backend, BatchConfig(4, 7))
    try:
        p = SamplingParams(max_new_tokens=8, ignore_eos=True)
        batched = [c.token_ids for c in generate(engine, PROMPTS, p)]
        single = [generate(engine, [q], p)[0].token_ids for q in PROMPTS]
        assert engine.scheduler.steps["prefill_chunks"] > len(PROMPTS) * 2  # prompts over 7 tokens went in chunks
        assert backend.free_slots() == 4
    finally:
        engine.shutdown()
    assert batched == single
    assert batched == [greedy_generate(backend.model, q, 8) for q in PROMPTS]


def test_prompts_admitted_together_prefill_as_one_batch(tiny_models):
    """Equal-length prompts share their prefill GEMMs (one batch per chunk position) and still give each
    prompt's own greedy tokens; a prompt of another length goes on its own."""
    be = KernelBackend(tiny_models["llama"], "cpu", KernelConfig(max_batch_size=4, max_prefill_tokens=64))
    prompts = [[5, 6, 7, 8, 9, 10], [100, 200, 300, 400, 500, 600], [7] * 6, [42, 43, 44]]
    engine = BatchingEngine(be, BatchConfig(4, 64))
    try:
        p = SamplingParams(max_new_tokens=6, ignore_eos=True)
        batched = [c.token_ids for c in generate(engine, prompts, p)]
        steps = dict(engine.scheduler.steps)
    finally:
        engine.shutdown()
    assert steps["prefill_chunks"] == 4 and steps["prefill_batches"] == 2  # the three 6-token prompts together
    assert batched == [greedy_generate(be.model, q, 6) for q in prompts]


def test_batched_prefill_rows_equal_one_slot_at_a_time(backend):
    from sqdeploy.kernels.slots import prefill_chunk, prefill_rows

    cache = backend.cache
    slots = [backend.acquire() for _ in range(3)]
    try:
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
        one = torch.stack([prefill_chunk(backend.model, cache, s, ids[i], 0) for i, s in enumerate(slots)])
        keys = [cache.k[0][s, :, :4].clone() for s in slots]
        for s in slots:
            backend.release(s)
        order = [slots[2], slots[0], slots[1]]  # rows need not come in slot order
        for s in order:
            assert backend.acquire() in slots
        together = prefill_rows(backend.model, cache, order, ids[[2, 0, 1]], 0)
        torch.testing.assert_close(together, one[[2, 0, 1]], rtol=1e-5, atol=1e-5)
        for i, s in enumerate(slots):
            torch.testing.assert_close(cache.k[0][s, :, :4], keys[i], rtol=1e-5, atol=1e-5)
        more = prefill_rows(backend.model, cache, slots, torch.tensor([[1, 2], [3, 4], [5, 6]]), 4)  # a second chunk
        assert more.shape[0] == 3 and [cache.host_lengths[s] for s in slots] == [6, 6, 6]
        with pytest.raises(SqDeployError, match="would leave a gap"):
            prefill_rows(backend.model, cache, slots, ids, 0)
        with pytest.raises(SqDeployError, match="distinct slots"):
            prefill_rows(backend.model, cache, [slots[0], slots[0]], ids[:2], 6)
    finally:
        for s in slots:
            backend.release(s)


def test_a_long_prompt_does_not_stall_running_rows(backend):
    sched = SlotScheduler(backend, BatchConfig(4, 7))  # driven by hand, step by step
    short = Sequence(GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True)), None,
                     backend.tokenizer, backend.info.eos_ids)
    sched.waiting.append(short)
    sched.step()
    assert len(short.tokens) == 2  # first token from the prefill, one decode step
    long = Sequence(GenerationRequest(list(range(10, 40)), SamplingParams(max_new_tokens=2, ignore_eos=True)), None,
                    backend.tokenizer, backend.info.eos_ids)
    sched.waiting.append(long)
    for i in range(4):  # 30 prompt tokens in chunks of 7: five steps, the short row decodes in every one
        sched.step()
        assert len(short.tokens) == 3 + i and not long.tokens
    sched.step()
    assert long.tokens and len(short.tokens) == 7
    short.cancel()
    sched.step()
    assert short.finish_reason == "cancelled"
    while sched.has_work():
        sched.step()
    assert long.finish_reason == "length" and backend.free_slots() == 4


def test_requests_beyond_the_cache_fail_alone(tiny_models):
    be = KernelBackend(tiny_models["llama"], "cpu", KernelConfig(max_batch_size=2, max_model_len=16))
    assert be.info.max_positions == 16
    engine = BatchingEngine(be, BatchConfig(2, 64))
    try:
        from sqdeploy.runtime.engine import _QueueSink

        sink = _QueueSink()
        engine.submit([GenerationRequest(list(range(3, 15)), SamplingParams(max_new_tokens=8)),
                       GenerationRequest([3, 4], SamplingParams(max_new_tokens=4, ignore_eos=True))], sink)
        done = {}
        while len(done) < 2:
            e = sink.q.get(timeout=60)
            if e.finish_reason:
                done[e.request_id] = e
        reasons = sorted(e.finish_reason for e in done.values())
        assert reasons == ["error", "length"]
    finally:
        engine.shutdown()


def test_budget_too_small_for_one_sequence(tiny_models):
    with pytest.raises(SqDeployError, match="cannot hold one sequence"):
        KernelBackend(tiny_models["llama"], "cpu", KernelConfig(kv_cache_gib=1e-6))


def test_open_engine_chooses_the_kernel_backend_only_on_a_gpu(tiny_models):
    path = tiny_models["llama"]
    assert resolve_backend(path, "auto", "cpu") == "torch"
    assert resolve_backend(path, "auto", "cuda") == "kernel"
    if not torch.cuda.is_available():
        assert resolve_backend(path, "auto", "auto") == "torch"
        with pytest.raises(SqDeployError, match="no CUDA GPU"):
            open_engine(path, device="cuda")
    engine = open_engine(path, "kernel", "cpu", batch=BatchConfig(2), kernel=KernelOptions(max_model_len=64))
    try:
        assert engine.info.backend == "kernel" and engine.info.max_positions == 64
        c = generate(engine, [[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.8, top_p=0.9, seed=1))[0]
        d = generate(engine, [[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.8, top_p=0.9, seed=1))[0]
        assert c.token_ids == d.token_ids
    finally:
        engine.shutdown()


def test_serve_refuses_cuda_without_a_gpu(tiny_models, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from sqdeploy.cli.common import run_cli
    from sqdeploy.cli.serve import main

    assert run_cli(main, [str(tiny_models["llama"]), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


def test_served_over_http_with_cancellation_and_a_too_long_request(tiny_models):
    import httpx

    from sqdeploy.runtime.server.limits import ServeLimits
    from sqdeploy.runtime.server.run import ServerThread

    engine = open_engine(tiny_models["llama"], "kernel", "cpu", batch=BatchConfig(2, 16), name="k",
                         kernel=KernelOptions(max_model_len=48))
    limits = ServeLimits(max_prompt_tokens=64, max_new_tokens=64, max_concurrent=2, max_queue=4, request_timeout_s=60,
                         max_body_bytes=1 << 16)
    want = generate(engine, ["def f(x):"], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    try:
        with ServerThread(engine, limits) as url:
            body = {"model": "k", "prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want.text
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 40, "stream": True},
                              timeout=60) as s:
                next(s.iter_lines())  # first chunk arrived; closing the stream cancels the request
            too_long = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "x " * 40, "max_tokens": 30}, timeout=60)
            assert 400 <= too_long.status_code < 500
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.json()["choices"][0]["text"] == want.text
        assert engine.backend.free_slots() == 2
    finally:
        engine.shutdown()


def test_serve_refuses_a_cache_budget_below_one_sequence(tiny_models, capsys):
    from sqdeploy.cli.common import run_cli
    from sqdeploy.cli.serve import main

    assert run_cli(main, [str(tiny_models["llama"]), "--backend", "kernel", "--device", "cpu", "--kv-cache-gib", "1e-6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-cache-gib" in err[-1]


def test_offline_benchmark_on_the_kernel_backend(tiny_models):
    from sqdeploy.runtime.bench.offline import EngineSpec, OfflineGrid, run_variant

    r = run_variant(EngineSpec(str(tiny_models["llama"]), "kernel", "cpu"), OfflineGrid((1, 2), (8,), (4,), 1, 0))
    assert r["engine_backend"] == "kernel" and [row["batch_size"] for row in r["rows"]] == [1, 2]
    assert all(row["tokens_per_s"] > 0 for row in r["rows"])
