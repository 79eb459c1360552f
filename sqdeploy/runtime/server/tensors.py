"""KServe v2 tensors on the wire: JSON ``data`` arrays and Triton's binary tensor extension.

A binary request is a JSON header of ``Inference-Header-Content-Length`` bytes followed
by the raw tensors, in input order, each ``parameters.binary_data_size`` long; a BYTES
element is a 4-byte little-endian length and its bytes. Responses use the same layout
when the client asks for binary outputs (tritonclient does by default).
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from sqdeploy.runtime.server.limits import RequestError, bad_request

DTYPES = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
HEADER = "inference-header-content-length"


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: list[Any]  # flat, row-major; BYTES as bytes


def decompress(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate, refusing bodies that inflate beyond ``limit``."""
    if not encoding or encoding == "identity":
        return raw
    if encoding not in ("gzip", "deflate"):
        raise RequestError(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(raw, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise bad_request(f"the {encoding} request body cannot be decompressed ({exc})") from None
    if len(out) > limit:
        raise RequestError(413, f"the decompressed request body exceeds the server's {limit} byte limit")
    return out


def split_body(raw: bytes, header_len: str | None) -> tuple[dict, bytes]:
    from sqdeploy.runtime.server.fields import parse_json

    if header_len is None:
        return parse_json(raw), b""
    try:
        n = int(header_len)
    except ValueError:
        raise bad_request(f"Inference-Header-Content-Length must be an integer (got {header_len!r})") from None
    if not 0 < n <= len(raw):
        raise bad_request(f"Inference-Header-Content-Length {n} does not fit the {len(raw)} byte body")
    return parse_json(raw[:n]), raw[n:]


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [v for x in data for v in _flatten(x)]
    return [data]


def _bytes_elements(buf: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(buf):
        if i + 4 > len(buf):
            raise bad_request("a BYTES tensor's binary data is truncated")
        (n,) = struct.unpack_from("<I", buf, i)
        if i + 4 + n > len(buf):
            raise bad_request("a BYTES tensor's binary data is truncated")
        out.append(buf[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def read_inputs(header: dict, binary: bytes) -> dict[str, Tensor]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("'inputs' must be a non-empty list of tensors", "inputs")
    out: dict[str, Tensor] = {}
    offset = 0
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad_request("each input must be an object with a 'name'", "inputs")
        name, dt, shape = t["name"], t.get("datatype"), t.get("shape")
        if dt != "BYTES" and dt not in DTYPES:
            raise bad_request(f"input '{name}': unknown datatype {dt!r}", name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad_request(f"input '{name}': 'shape' must be a list of non-negative integers", name)
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or offset + size > len(binary):
                raise bad_request(f"input '{name}': binary_data_size does not fit the binary part of the body", name)
            chunk = binary[offset : offset + size]
            offset += size
            values = _bytes_elements(chunk) if dt == "BYTES" else np.frombuffer(chunk, DTYPES[dt]).tolist()
        elif "data" in t:
            values = _flatten(t["data"])
        else:
            raise bad_request(f"input '{name}' has neither 'data' nor binary data", name)
        if len(values) != int(np.prod(shape)):
            raise bad_request(f"input '{name}': {len(values)} values do not fill shape {shape}", name)
        out[name] = Tensor(name, dt, shape, values)
    return out


def bytes_output(name: str, shape: list[int], texts: list[str], binary: bool) -> tuple[dict, bytes]:
    if not binary:
        return {"name": name, "datatype": "BYTES", "shape": shape, "data": texts}, b""
    blob = b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in texts))
    return {"name": name, "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(blob)}}, blob


def wants_binary(header: dict, name: str) -> bool:
    for o in header.get("outputs") or []:
        if isinstance(o, dict) and o.get("name") == name:
            return bool((o.get("parameters") or {}).get("binary_data", False))
    return bool((header.get("parameters") or {}).get("binary_data_output", False))


def encode_response(body: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(body, ensure_ascii=False).encode()
    if not any(blobs):
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}
