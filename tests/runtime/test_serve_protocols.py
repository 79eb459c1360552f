"""sq-serve through the clients users have: the openai package and tritonclient[http]."""

from __future__ import annotations

import gzip
import json
import threading

import httpx
import numpy as np
import pytest

from sqdeploy.runtime import BatchConfig, SamplingParams, generate, open_engine
from sqdeploy.runtime.server.limits import ServeLimits
from sqdeploy.runtime.server.run import ServerThread
from tests.runtime_support import tiny_onnx

openai = pytest.importorskip("openai", reason="the openai client is a test extra: pip install 'sq-deploy[test]'")
triton = pytest.importorskip("tritonclient.http", reason="tritonclient is a test extra: pip install 'sq-deploy[test]'")

LIMITS = ServeLimits(
    max_prompt_tokens=64, max_new_tokens=64, max_concurrent=4, max_queue=4, request_timeout_s=60, max_body_bytes=1 << 16
)
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models):
    e = open_engine(tiny_onnx(tmp_path_factory, tiny_models), batch=BatchConfig(max_batch_size=4), name="tiny")
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with ServerThread(engine, LIMITS) as u:
        yield u


@pytest.fixture(scope="module")
def expected(engine):
    return generate(engine, [PROMPT, "x = ["], SamplingParams(max_new_tokens=8))


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_completions_plain_and_streaming(url, expected):
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected[0].text and r.choices[0].finish_reason == expected[0].finish_reason
    assert r.usage.completion_tokens == len(expected[0].token_ids)
    chunks = list(
        c.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected[0].text
    assert sum(1 for ch in chunks if ch.choices) == len(expected[0].token_ids)  # one chunk per token
    assert chunks[-1].usage.completion_tokens == len(expected[0].token_ids)
    many = c.completions.create(model="tiny", prompt=[PROMPT, "x = ["], max_tokens=8, temperature=0, echo=True)
    assert [ch.text for ch in many.choices] == [PROMPT + expected[0].text, "x = [" + expected[1].text]
    ids = c.completions.create(model="tiny", prompt=expected[0].prompt_ids, max_tokens=8, temperature=0)
    assert ids.choices[0].text == expected[0].text
    stop = expected[0].text[2:5]
    cut = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[0].text[: expected[0].text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_openai_errors_are_4xx_with_a_message(url):
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        c.completions.create(model="tiny", prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="at most 64") as e:
        c.completions.create(model="tiny", prompt="x " * 100, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="other", prompt=PROMPT)


def test_triton_health_metadata_and_infer(url, expected):
    c = triton.InferenceServerClient(url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
    assert not c.is_model_ready("other")
    assert "generate" in c.get_server_metadata()["extensions"]
    meta = c.get_model_metadata("tiny")
    assert {t["name"] for t in meta["inputs"]} >= {"text_input", "max_tokens"} and meta["outputs"][0]["name"] == "text_output"
    text = triton.InferInput("text_input", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROMPT], ["x = ["]], dtype=object))
    budget = triton.InferInput("max_tokens", [2, 1], "INT32")
    budget.set_data_from_numpy(np.array([[8], [8]], dtype=np.int32))
    out = c.infer("tiny", [text, budget]).as_numpy("text_output")  # binary tensors both ways (the client's default)
    assert out.shape == (2, 1) and [o.decode() for o in out[:, 0]] == [e.text for e in expected]
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT], dtype=object), binary_data=False)
    res = c.infer(
        "tiny",
        [text],
        outputs=[triton.InferRequestedOutput("text_output", binary_data=False)],
        parameters={"max_tokens": 8},
        request_compression_algorithm="gzip",
    )
    assert res.as_numpy("text_output")[0] == expected[0].text  # JSON outputs come back as str
    bad = triton.InferInput("prompt", [1], "BYTES")
    bad.set_data_from_numpy(np.array([PROMPT], dtype=object))
    with pytest.raises(triton.InferenceServerException, match="unknown input 'prompt'") as e:
        c.infer("tiny", [bad])
    assert e.value.status() == "400"


def test_triton_generate_extension(url, expected):
    r = httpx.post(f"{url}/v2/models/tiny/generate", json={"text_input": PROMPT, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["text_output"] == expected[0].text
    with httpx.stream(
        "POST", f"{url}/v2/models/tiny/generate_stream", json={"text_input": PROMPT, "parameters": {"max_tokens": 8}}
    ) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e["text_output"] for e in events) == expected[0].text and events[-1]["finish_reason"] == "length"
    r = httpx.post(f"{url}/v2/models/tiny/generate", json={"text_input": PROMPT, "max_tokens": -1})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"model": "tiny", "prompt": {"a": 1}}).encode(), 400, "'prompt'"),
        (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "8"}).encode(), 400, "'max_tokens' must be an integer"),
        (json.dumps({"model": "tiny", "prompt": "x", "temperature": True}).encode(), 400, "'temperature' must be a number"),
        (json.dumps({"model": "tiny", "prompt": "x", "stop": [1]}).encode(), 400, "'stop'"),
        (json.dumps({"model": "tiny", "prompt": "x" * 70000}).encode(), 413, "byte limit"),
        (gzip.compress(b"{}"), 400, "not valid JSON"),
    ],
)
def test_malformed_requests_get_json_errors(url, body, status, needle):
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and needle in r.json()["error"]["message"]


def test_unknown_routes_and_infer_garbage(url):
    r = httpx.get(f"{url}/v2/models/tiny/nothing")
    assert r.status_code == 404 and "Not Found" in r.json()["error"]
    assert httpx.get(f"{url}/v1/completions").status_code == 405
    r = httpx.post(f"{url}/v2/models/tiny/infer", content=b'{"inputs": [{"name": "text_input"}]}')
    assert r.status_code == 400 and "datatype" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/tiny/infer", content=b"{}xx", headers={"Inference-Header-Content-Length": "999"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


def test_metrics_in_prometheus_format(url):
    client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=4, stream=True).close()
    httpx.post(f"{url}/v1/completions", content=b"{")
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "sqdeploy_requests_total",
        "sqdeploy_generation_tokens_total",
        "sqdeploy_queue_depth",
        "sqdeploy_time_to_first_token_seconds_bucket",
        "sqdeploy_inter_token_latency_seconds_bucket",
    ):
        assert name in text
    assert 'sqdeploy_requests_total{route="/v1/completions",status="400"}' in text


def test_engine_time_reaches_metrics_and_the_online_benchmark(url):
    """The engine's counters are exported, and a benchmark point splits the worker's time between two
    scrapes by the server's own clock: steps + delivering + idle add up to that window, short of it by at
    most an interval still running at the second reading (the worker is idle at the first)."""
    import asyncio

    from sqdeploy.runtime.bench.online import LoadPoint, RequestSpec, run_point

    ids = list(range(5, 25))
    point = asyncio.run(run_point(url, "tiny", [RequestSpec(ids, 6)] * 6, LoadPoint("concurrency", 3)))
    e = point["engine"]
    assert point["failed"] == 0 and e["steps"] >= 6
    assert 0.8 < e["step_fraction"] + e["deliver_fraction"] + e["idle_fraction"] <= 1.0 + 1e-9, e
    text = httpx.get(f"{url}/metrics").text
    assert "sqdeploy_engine_step_seconds_total" in text and "sqdeploy_engine_clock_seconds_total" in text


def test_overload_is_429_and_timeout_is_504(engine):
    with ServerThread(engine, ServeLimits(max_concurrent=1, max_queue=0, max_new_tokens=250)) as url:
        c = client(url)
        long = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=240, stream=True, extra_body={"ignore_eos": True})
        next(iter(long))  # the one slot is taken
        with pytest.raises(openai.RateLimitError, match="capacity"):
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        long.close()  # leaving frees the slot
        done = threading.Event()
        for _ in range(100):
            try:
                c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
                done.set()
                break
            except openai.RateLimitError:
                done.wait(0.05)
        assert done.is_set()
    with ServerThread(engine, ServeLimits(request_timeout_s=0.05, max_new_tokens=250)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 240, "ignore_eos": True})
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
