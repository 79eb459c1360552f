"""The OpenAI and KServe routes with their real clients: chat, typed bodies, vLLM's extensions, Triton statistics,
the API key, and bad bodies that must be a 400 on a connection that stays usable."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from sqdeploy.cli.serve import build_parser
from sqdeploy.runtime import SamplingParams, generate
from sqdeploy.runtime.server.limits import ServeOptions
from sqdeploy.runtime.server.run import ServerThread
from tests.runtime.test_serve_protocols import LIMITS, PROMPT, client, engine, url  # noqa: F401 - fixtures

openai = pytest.importorskip("openai", reason="the openai client is a test extra: pip install 'sq-deploy[test]'")
triton = pytest.importorskip("tritonclient.http", reason="tritonclient is a test extra: pip install 'sq-deploy[test]'")

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A fibonacci function?"}]


@pytest.fixture(scope="module")
def chat_url(engine):  # noqa: F811
    with ServerThread(engine, LIMITS, options=ServeOptions(chat_template=TEMPLATE)) as u:
        yield u


def test_chat_completions_plain_and_streaming(engine, chat_url):  # noqa: F811
    rendered = engine.tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids.count(engine.tokenizer.bos_token_id) == 1  # the template's BOS, not a second one
    (want,) = generate(engine, [ids], SamplingParams(max_new_tokens=8))
    c = client(chat_url)
    r = c.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.token_ids))
    chunks = list(
        c.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "A fibonacci"}, {"type": "text", "text": "function?"}]}]
    joined = [{"role": "user", "content": "A fibonacci\nfunction?"}]
    a = c.chat.completions.create(model="tiny", messages=parts, max_tokens=4, temperature=0)
    b = c.chat.completions.create(model="tiny", messages=joined, max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_without_a_template_names_the_remedy(url):  # noqa: F811
    with pytest.raises(openai.BadRequestError, match="--chat-template FILE"):
        client(url).chat.completions.create(model="tiny", messages=MESSAGES)


def test_chat_template_option_is_checked_at_start(tmp_path, tiny_models):
    from sqdeploy.cli.serve import main

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(Exception, match="not a usable chat template"):
        main([str(tiny_models["llama"]), "--backend", "torch", "--chat-template", str(bad)])
    with pytest.raises(Exception, match="cannot read"):
        main([str(tiny_models["llama"]), "--chat-template", str(tmp_path / "missing.jinja")])


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"foo": 1}, "unknown field 'foo'"),
        ({"response_format": {"type": "json_object"}}, "'response_format' is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools' is not supported"),
        ({"logit_bias": {"5": 10}}, "'logit_bias' is not supported"),
        ({"logprobs": True}, "'logprobs' is not supported"),
        ({"seed": -2}, "'seed'"),
        ({"seed": 2**64}, "'seed'"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens must be between 0 and max_tokens"),
        ({"repetition_penalty": 0}, "'repetition_penalty'"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "send one of them"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "'messages'"),
        ({"messages": []}, "'messages'"),
    ],
)
def test_chat_fields_are_checked_by_name(chat_url, extra, needle):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(f"{chat_url}/v1/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and needle in err["message"] and err["type"] == "invalid_request_error", r.text


def test_completions_fields_and_vllm_extensions(engine, url):  # noqa: F811
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="unknown field 'foo'") as e:
        c.completions.create(model="tiny", prompt=PROMPT, extra_body={"foo": 1})
    assert e.value.body["param"] == "foo"
    with pytest.raises(openai.BadRequestError, match="'presence_penalty' is not supported"):
        c.completions.create(model="tiny", prompt=PROMPT, presence_penalty=0.5)
    c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, presence_penalty=0, n=1, logit_bias={})  # defaults
    want = generate(engine, [PROMPT], SamplingParams(max_new_tokens=8, repetition_penalty=1.3, min_tokens=8))[0]
    r = c.completions.create(
        model="tiny",
        prompt=PROMPT,
        temperature=0,
        extra_body={"max_completion_tokens": 8, "repetition_penalty": 1.3, "min_tokens": 8},
    )
    assert r.choices[0].text == want.text and r.usage.completion_tokens == 8
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0.8, seed=-1)  # -1: no seed, as vLLM
    assert r.usage.completion_tokens <= 4
    seeded = [
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7).choices[0].text for _ in "ab"
    ]
    assert seeded[0] == seeded[1]


def test_bad_bodies_are_400_and_the_connection_stays_usable(url):  # noqa: F811
    nested = b'{"model": "tiny", "prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    with httpx.Client(base_url=url) as h:
        ports = []
        for path, body in (("/v1/completions", nested), ("/v1/chat/completions", nested), ("/v2/models/tiny/generate", nested)):
            r = h.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "JSON" in r.text, (path, r.text)
            ports.append(r.extensions["network_stream"].get_extra_info("client_addr"))
        ok = h.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200
        ports.append(ok.extensions["network_stream"].get_extra_info("client_addr"))
        assert len(set(ports)) == 1  # one keep-alive connection throughout
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": [PROMPT] * (LIMITS.capacity + 1), "max_tokens": 2})
        assert r.status_code == 400 and f"at most {LIMITS.capacity}" in r.json()["error"]["message"]  # never fits: not 429


def test_triton_statistics(url):  # noqa: F811
    c = triton.InferenceServerClient(url.removeprefix("http://"))
    assert "statistics" in c.get_server_metadata()["extensions"]
    before = c.get_inference_statistics("tiny")["model_stats"][0]
    text = triton.InferInput("text_input", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROMPT], ["x = ["]], dtype=object))
    c.infer("tiny", [text])
    after = c.get_inference_statistics("tiny")["model_stats"][0]
    assert after["name"] == "tiny" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 2
    assert after["execution_count"] - before["execution_count"] == 1
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert s1["success"]["count"] - s0["success"]["count"] == 2 and s1["success"]["ns"] > s0["success"]["ns"]
    assert s1["queue"]["count"] - s0["queue"]["count"] == 2 and s1["compute_infer"]["ns"] > s0["compute_infer"]["ns"]
    assert s1["compute_infer"]["ns"] - s0["compute_infer"]["ns"] <= s1["success"]["ns"] - s0["success"]["ns"]
    assert after["last_inference"] > 0
    assert c.get_inference_statistics()["model_stats"][0]["name"] == "tiny"
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        c.get_inference_statistics("other")


def test_api_key(engine, monkeypatch):  # noqa: F811
    with ServerThread(engine, LIMITS, options=ServeOptions(api_key="s3cret")) as u:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            client(u).models.list()
        good = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        for path in ("/health", "/v2/health/live", "/v2/health/ready"):
            assert httpx.get(f"{u}{path}").status_code == 200
        for path in ("/metrics", "/v2", "/v2/models/tiny", "/v1/models"):
            r = httpx.get(f"{u}{path}")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.text
        r = httpx.post(f"{u}/v1/completions", json={"model": "tiny", "prompt": PROMPT}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        t = triton.InferenceServerClient(u.removeprefix("http://"))
        assert t.get_server_metadata(headers={"Authorization": "Bearer s3cret"})["name"] == "sq-deploy"
        with pytest.raises(triton.InferenceServerException):
            t.get_server_metadata()
    monkeypatch.setenv("SQDEPLOY_API_KEY", "from-env")
    assert build_parser().parse_args(["dir"]).api_key == "from-env"
    assert build_parser().parse_args(["dir", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("SQDEPLOY_API_KEY")
    args = build_parser().parse_args(["dir"])
    assert args.api_key is None and args.host == "127.0.0.1"
    assert "s3cret" not in repr(ServeOptions(api_key="s3cret"))


class _BrokenStats:
    """An engine whose statistics fail: /metrics raises inside the application."""

    def __init__(self, wrapped):
        self._engine = wrapped

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stats(self):
        raise RuntimeError("boom")


def test_an_internal_error_is_json_and_keeps_the_connection(engine):  # noqa: F811
    with ServerThread(_BrokenStats(engine), LIMITS) as u, httpx.Client(base_url=u) as h:
        r = h.get("/metrics")
        assert r.status_code == 500 and "internal error (RuntimeError)" in r.json()["error"]
        ok = h.get("/v1/models")
        assert ok.status_code == 200
        addr = lambda resp: resp.extensions["network_stream"].get_extra_info("client_addr")
        assert addr(r) == addr(ok)
