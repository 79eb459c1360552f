"""KServe v2 / Triton HTTP protocol: health, metadata, ``infer`` and Triton's ``generate`` extension.

The model takes the tensors Triton's TensorRT-LLM ensemble takes (``text_input``
BYTES, ``max_tokens``, optional ``temperature``, ``top_k``, ``top_p``,
``random_seed``, ``stop_words``, plus ``ignore_eos``) and returns ``text_output``
(the generated text, without the prompt). Errors are ``{"error": "..."}`` as Triton
sends them.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sqdeploy import __version__
from sqdeploy.runtime.server.bridge import EventStream, serving
from sqdeploy.runtime.server.fields import build_requests, get_bool, get_float, get_int, get_stops, make_params, parse_json
from sqdeploy.runtime.server.limits import RequestError, bad_request
from sqdeploy.runtime.server.tensors import (
    HEADER,
    bytes_output,
    decompress,
    encode_response,
    read_inputs,
    split_body,
    wants_binary,
)

router = APIRouter()

INPUTS = [  # name, datatype, shape, optional
    ("text_input", "BYTES", [-1], False),
    ("max_tokens", "INT32", [-1], True),
    ("temperature", "FP32", [-1], True),
    ("top_k", "INT32", [-1], True),
    ("top_p", "FP32", [-1], True),
    ("random_seed", "UINT64", [-1], True),
    ("stop_words", "BYTES", [-1], True),
    ("ignore_eos", "BOOL", [-1], True),
]
OUTPUTS = [("text_output", "BYTES", [-1])]
VERSION = "1"


def _model(request: Request, name: str, version: str | None = None):
    engine = request.app.state.engine
    if name != engine.info.name or version not in (None, "", VERSION):
        raise RequestError(
            404,
            f"unknown model '{name}' version '{version or VERSION}'; this server serves '{engine.info.name}' version {VERSION}",
        )
    return engine


@router.get("/v2")
async def server_metadata():
    return {"name": "sq-deploy", "version": __version__, "extensions": ["binary_tensor_data", "generate", "statistics"]}


@router.get("/v2/health/live")
async def live():
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request):
    return Response(status_code=503 if not serving(request) else 200)


@router.get("/v2/models/stats")
async def all_statistics(request: Request):
    """Triton's statistics of every model (this server has one); before ``/v2/models/{name}`` so it is not a name."""
    return {"model_stats": [request.app.state.bridge.stats.model_stats(request.app.state.engine.info.name, VERSION)]}


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def model_statistics(request: Request, name: str, version: str | None = None):
    engine = _model(request, name, version)
    return {"model_stats": [request.app.state.bridge.stats.model_stats(engine.info.name, VERSION)]}


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None):
    engine = _model(request, name, version)
    tensor = lambda n, d, s: {"name": n, "datatype": d, "shape": s}
    return {
        "name": engine.info.name,
        "versions": [VERSION],
        "platform": f"sq-deploy/{engine.info.backend}",
        "inputs": [tensor(n, d, s) for n, d, s, _ in INPUTS],
        "outputs": [tensor(*o) for o in OUTPUTS],
    }


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None):
    _model(request, name, version)
    return Response(status_code=503 if not serving(request) else 200)


@router.get("/v2/models/{name}/config")
async def model_config(request: Request, name: str):
    engine = _model(request, name)
    st = request.app.state
    t = lambda n, d, s, opt=False: {
        "name": n,
        "data_type": "TYPE_STRING" if d == "BYTES" else f"TYPE_{d}",
        "dims": s,
        "optional": opt,
    }
    return {
        "name": engine.info.name,
        "backend": engine.info.backend,
        "max_batch_size": st.limits.max_concurrent,
        "input": [t(*i) for i in INPUTS],
        "output": [t(*o) for o in OUTPUTS],
        "model_transaction_policy": {"decoupled": False},
    }


def _scalars(values: dict, limits, n: int):
    """Sampling params for ``n`` prompts from per-prompt or broadcast values."""
    per = {}
    for k, v in values.items():
        if isinstance(v, list) and k != "stop_words":
            if len(v) not in (1, n):
                raise bad_request(f"'{k}' has {len(v)} values for {n} prompts; send 1 or {n}", k)
            per[k] = v if len(v) == n else v * n
        else:
            per[k] = [v] * n
    out = []
    for i in range(n):
        row = {k: v[i] for k, v in per.items()}
        row = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in row.items()}
        if isinstance(row.get("stop_words"), list):
            row["stop_words"] = [s.decode() if isinstance(s, bytes) else s for s in row["stop_words"]]
        out.append(
            make_params(
                limits,
                get_int(row, "max_tokens", 16, lo=1),
                temperature=get_float(row, "temperature", 0.0, 0.0, 100.0),
                top_k=get_int(row, "top_k", 0, lo=0),
                top_p=get_float(row, "top_p", 1.0, 1e-9, 1.0),
                seed=get_int(row, "random_seed", None, lo=0),
                stop=get_stops(row, "stop_words"),
                ignore_eos=get_bool(row, "ignore_eos"),
            )
        )
    return out


def _texts(values: list) -> list[str]:
    try:
        return [v.decode() if isinstance(v, bytes) else v for v in values]
    except UnicodeDecodeError:
        raise bad_request("'text_input' must be UTF-8 text", "text_input") from None


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str, version: str | None = None):
    engine = _model(request, name, version)
    st = request.app.state
    raw = decompress(await request.body(), request.headers.get("content-encoding"), st.limits.max_body_bytes)
    header, binary = split_body(raw, request.headers.get(HEADER))
    tensors = read_inputs(header, binary)
    known = {n for n, *_ in INPUTS}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise bad_request(f"unknown input '{unknown[0]}'; this model takes {', '.join(sorted(known))}", unknown[0])
    if "text_input" not in tensors or tensors["text_input"].datatype != "BYTES":
        raise bad_request("the BYTES input 'text_input' is required", "text_input")
    for o in header.get("outputs") or []:
        if not isinstance(o, dict) or o.get("name") != "text_output":
            raise bad_request(f"unknown output {o.get('name') if isinstance(o, dict) else o!r}; this model returns text_output")
    prompts = _texts(tensors["text_input"].values)
    if not prompts:
        raise bad_request("'text_input' is empty", "text_input")
    extra = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
    values = {k: v for k, v in extra.items() if k in known and k != "text_input"}  # request-level sampling parameters
    values.update({k: t.values for k, t in tensors.items() if k != "text_input"})
    params = _scalars(values, st.limits, len(prompts))
    reqs = await build_requests(engine, prompts, params, st.limits)
    texts = [""] * len(reqs)
    index = {r.request_id: i for i, r in enumerate(reqs)}
    async with st.bridge.open(reqs, request.receive) as gen:
        async for e in gen.events():
            if e.finish_reason == "error":
                raise RequestError(500, f"generation failed: {e.error}")
            if e.finish_reason is not None:
                texts[index[e.request_id]] = e.completion.text
    out, blob = bytes_output("text_output", tensors["text_input"].shape, texts, wants_binary(header, "text_output"))
    body = {"model_name": engine.info.name, "model_version": VERSION, "outputs": [out]}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    content, headers = encode_response(body, [blob])
    return Response(content, headers=headers)


def _generate_request(body: dict, limits) -> tuple[str, object]:
    text = body.get("text_input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str) or not text:
        raise bad_request("'text_input' must be a non-empty string", "text_input")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("'parameters' must be an object", "parameters")
    values = {k: v for k, v in {**params, **body}.items() if k in {n for n, *_ in INPUTS} and k != "text_input"}
    values = {k: (v[0] if isinstance(v, list) and len(v) == 1 and k != "stop_words" else v) for k, v in values.items()}
    if any(isinstance(v, list) for k, v in values.items() if k != "stop_words"):
        raise bad_request("generate takes one prompt; each sampling value must be a single value")
    return text, _scalars(values, limits, 1)[0]


@router.post("/v2/models/{name}/generate")
@router.post("/v2/models/{name}/versions/{version}/generate")
async def generate(request: Request, name: str, version: str | None = None):
    engine = _model(request, name, version)
    st = request.app.state
    text, params = _generate_request(parse_json(await request.body()), st.limits)
    reqs = await build_requests(engine, [text], params, st.limits)
    async with st.bridge.open(reqs, request.receive) as gen:
        async for e in gen.events():
            if e.finish_reason == "error":
                raise RequestError(500, f"generation failed: {e.error}")
            if e.finish_reason is not None:
                return JSONResponse(
                    {
                        "model_name": engine.info.name,
                        "model_version": VERSION,
                        "text_output": e.completion.text,
                        "finish_reason": e.finish_reason,
                    }
                )


@router.post("/v2/models/{name}/generate_stream")
@router.post("/v2/models/{name}/versions/{version}/generate_stream")
async def generate_stream(request: Request, name: str, version: str | None = None):
    engine = _model(request, name, version)
    st = request.app.state
    text, params = _generate_request(parse_json(await request.body()), st.limits)
    reqs = await build_requests(engine, [text], params, st.limits)
    gen = st.bridge.open(reqs)
    head = {"model_name": engine.info.name, "model_version": VERSION}

    async def events():
        try:
            async for e in gen.events():
                if e.finish_reason == "error":
                    yield f"data: {json.dumps({'error': f'generation failed: {e.error}'})}\n\n"
                elif e.text or e.finish_reason is not None:
                    extra = {"finish_reason": e.finish_reason} if e.finish_reason else {}
                    yield f"data: {json.dumps({**head, 'text_output': e.text, **extra}, ensure_ascii=False)}\n\n"
        except RequestError as exc:
            yield f"data: {json.dumps({'error': exc.message})}\n\n"

    return EventStream(gen, events())
