"""Triton's own ModelConfig protobuf, used to write and to parse every ``config.pbtxt``.

Configs are built as plain dicts, turned into ``inference.ModelConfig`` messages with
``json_format.ParseDict`` (an unknown field or enum value is an error here, not when
the server starts) and written with ``text_format``. ``tritonclient`` ships the
generated module as ``tritonclient.grpc.model_config_pb2``; that package's
``__init__`` needs grpcio, which nothing else here needs, so the module is loaded
from its file when the gRPC extra is absent.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import MissingDependencyError, SqDeployError

HEADER = "# Written by sq-build; every value is filled in (no template placeholders).\n"


@lru_cache(maxsize=1)
def model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2 as mod  # with the [grpc] extra

        return mod
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("tritonclient", "writing and checking Triton model repositories", "pip install 'tritonclient[http]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.exists():
        raise MissingDependencyError("tritonclient", "Triton's ModelConfig schema (tritonclient/grpc/model_config_pb2.py)", "pip install -U 'tritonclient[http]'")
    name = "sqdeploy_triton_model_config_pb2"
    if name not in sys.modules:
        mspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def to_message(config: dict[str, Any]):
    from google.protobuf import json_format

    try:
        return json_format.ParseDict(config, model_config_pb2().ModelConfig())
    except json_format.ParseError as exc:
        raise SqDeployError(f"model config '{config.get('name')}' does not fit Triton's ModelConfig schema: {exc}") from None


def to_pbtxt(config: dict[str, Any]) -> str:
    from google.protobuf import text_format

    return HEADER + text_format.MessageToString(to_message(config))


def parse_pbtxt(text: str, where: str = "config.pbtxt"):
    """A ModelConfig message from config.pbtxt text; a parse error names the file."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_pb2().ModelConfig())
    except text_format.ParseError as exc:
        raise SqDeployError(f"{where} does not parse as Triton's ModelConfig: {exc}") from None


def tensor(name: str, dtype: str, dims: list[int], optional: bool = False, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "data_type": dtype, "dims": dims}
    if optional:
        out["optional"] = True
    out.update(extra)
    return out


def scalar_input(name: str, dtype: str, optional: bool = True) -> dict[str, Any]:
    """A [1] input the TensorRT-LLM backend reads as a scalar (``reshape: {shape: []}``)."""
    return tensor(name, dtype, [1], optional, reshape={"shape": []})


def parameters(values: dict[str, Any]) -> dict[str, Any]:
    """Triton string parameters; booleans as "true"/"false"."""
    return {k: {"string_value": ("true" if v else "false") if isinstance(v, bool) else str(v)} for k, v in values.items()}
