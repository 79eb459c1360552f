"""Load: 200 requests from 16 concurrent clients, 10% malformed, against one server."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sqdeploy.runtime import BatchConfig, SamplingParams, generate, open_engine
from sqdeploy.runtime.server.limits import ServeLimits
from sqdeploy.runtime.server.run import ServerThread
from tests.runtime_support import shared_onnx

openai = pytest.importorskip("openai", reason="the openai client is a test extra: pip install 'sq-deploy[test]'")
triton = pytest.importorskip("tritonclient.http", reason="tritonclient is a test extra: pip install 'sq-deploy[test]'")

PROMPTS = [
    "def fibonacci(n):",
    "import os\n\ndef main(",
    "class Config:\n    def",
    "for i in range(",
    "x = [",
    "return self.",
    "with open(path) as f:",
    "if __name__ == '__main__':",
]
MALFORMED = [  # (body, expected status)
    (b"{not json", 400),
    (json.dumps({"model": "m", "prompt": "x", "max_tokens": "four"}).encode(), 400),
    (json.dumps({"model": "m", "prompt": {"text": "x"}}).encode(), 400),
    (json.dumps({"model": "m", "prompt": "x", "temperature": -3}).encode(), 400),
    (json.dumps({"model": "m", "prompt": "x " * 300}).encode(), 400),  # over the prompt limit
    (json.dumps({"model": "m", "prompt": "x", "max_tokens": 10_000}).encode(), 400),
    (json.dumps({"model": "m"}).encode(), 400),
    (json.dumps({"model": "m", "prompt": "x" * 40_000}).encode(), 413),
    (json.dumps({"model": "elsewhere", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": "m", "prompt": "x", "n": 3}).encode(), 400),
]
MAX_TOKENS = 6


def test_200_requests_16_clients_10_percent_malformed(tmp_path_factory, shared_model):
    engine = open_engine(shared_onnx(tmp_path_factory, shared_model), batch=BatchConfig(max_batch_size=8), name="m")
    try:
        expected = {p: c.text for p, c in zip(PROMPTS, generate(engine, PROMPTS, SamplingParams(max_new_tokens=MAX_TOKENS)))}
        limits = ServeLimits(max_prompt_tokens=128, max_new_tokens=64, max_concurrent=8, max_queue=16, max_body_bytes=32 << 10)
        with ServerThread(engine, limits) as url:
            rng = random.Random(0)
            jobs = [
                ("bad", MALFORMED[(i // 10) % len(MALFORMED)])
                if i % 10 == 3
                else (rng.choice(["plain", "stream"]), rng.choice(PROMPTS))
                for i in range(200)
            ]
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            with httpx.Client(base_url=url, timeout=60) as raw:

                def run(job):
                    kind, arg = job
                    if kind == "bad":
                        r = raw.post("/v1/completions", content=arg[0], headers={"content-type": "application/json"})
                        return r.status_code == arg[1] and "message" in r.json()["error"]
                    if kind == "plain":
                        out = c.completions.create(model="m", prompt=arg, max_tokens=MAX_TOKENS, temperature=0)
                        return out.choices[0].text == expected[arg]
                    chunks = c.completions.create(model="m", prompt=arg, max_tokens=MAX_TOKENS, temperature=0, stream=True)
                    return "".join(ch.choices[0].text for ch in chunks) == expected[arg]

                with ThreadPoolExecutor(16) as pool:
                    results = list(pool.map(run, jobs))
            bad = [(j[0], j[1] if j[0] != "bad" else j[1][1]) for j, ok in zip(jobs, results) if not ok]
            assert not bad, f"{len(bad)} wrong answers, e.g. {bad[:3]}"
            assert sum(j[0] == "bad" for j in jobs) == 20
            tc = triton.InferenceServerClient(url.removeprefix("http://"))
            assert tc.is_server_ready() and tc.is_model_ready("m")
            metrics = httpx.get(f"{url}/metrics").text
            assert 'status="500"' not in metrics and "sqdeploy_inflight_sequences 0.0" in metrics
    finally:
        engine.shutdown()
