"""One ONNX directory contract: every reader decides "is this an ONNX export" the same way,
the manifest's required fields and the session file are validated in one place, and no
other module spells the contract's file names."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from sqdeploy.core.errors import SqDeployError
from sqdeploy.engines.triton import detect_source
from sqdeploy.formats.onnx import contract
from sqdeploy.formats.onnx.contract import (
    GRAPH,
    META,
    REQUIRED_FIELDS,
    SESSION,
    OnnxExport,
    is_onnx_dir,
    read_manifest,
    read_session,
)
from sqdeploy.formats.onnx.reader import READER
from sqdeploy.runtime import resolve_backend
from sqdeploy.testing.tiny_onnx import write_tiny_onnx_dir

PACKAGE = Path(contract.__file__).resolve().parents[2]
# the foundation layer lists every manifest name for its output-safety checks; it cannot import formats
FOUNDATION = {"core/integrity.py", "core/output.py"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_onnx_dir(tmp_path_factory.mktemp("contract") / "tiny")


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_every_reader_agrees_on_an_export(tiny, tmp_path):
    no_manifest = _copy(tiny, tmp_path / "no_manifest", (META,))
    no_graph = _copy(tiny, tmp_path / "no_graph", (GRAPH,))
    renamed = _copy(tiny, tmp_path / "renamed")
    (renamed / GRAPH).rename(renamed / "model.opt.onnx")  # an engine directory may name its graph in session.json
    assert is_onnx_dir(tiny) and is_onnx_dir(renamed)
    assert not is_onnx_dir(no_manifest) and not is_onnx_dir(no_graph)
    for d in (tiny, renamed, no_manifest, no_graph):
        onnx = is_onnx_dir(d)
        assert READER.detect(d) == onnx
        assert (resolve_backend(d) == "onnxruntime") == onnx
    assert detect_source(tiny) == "onnx"
    with pytest.raises(SqDeployError, match=f"no {META}"):
        detect_source(no_manifest)


@pytest.mark.parametrize("field", sorted(REQUIRED_FIELDS))
def test_a_missing_required_field_is_named(tiny, tmp_path, field):
    d = _copy(tiny, tmp_path / "d")
    meta = json.loads((d / META).read_text())
    del meta[field]
    (d / META).write_text(json.dumps(meta))
    with pytest.raises(SqDeployError, match=f"field '{field}' is missing"):
        read_manifest(d)
    with pytest.raises(SqDeployError, match=f"field '{field}' is missing"):
        OnnxExport(d)


def test_manifest_format_and_version(tiny, tmp_path):
    assert read_manifest(tiny)["num_layers"] == 2
    d = _copy(tiny, tmp_path / "d")
    meta = json.loads((d / META).read_text())
    (d / META).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(SqDeployError, match="newer sq-deploy"):
        read_manifest(d)
    (d / META).write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(SqDeployError, match="not an sq-deploy ONNX description"):
        read_manifest(d)


def test_session_settings(tiny, tmp_path):
    assert read_session(tiny) is None
    d = _copy(tiny, tmp_path / "d")
    (d / SESSION).write_text(json.dumps({"format": "sqdeploy.ort-engine", "model": GRAPH, "execution_provider": "CPUExecutionProvider",
                                         "graph_optimization_level": "ORT_DISABLE_ALL", "execution_mode": "sequential",
                                         "optimized_offline": {}}))
    assert read_session(d) == {"execution_provider": "CPUExecutionProvider", "graph_optimization_level": "ORT_DISABLE_ALL",
                               "execution_mode": "sequential"}
    (d / SESSION).write_text(json.dumps({"graph_optimization_level": "ORT_FASTEST"}))
    with pytest.raises(SqDeployError, match="unknown optimisation level"):
        read_session(d)


def _literals(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_only_the_contract_spells_the_file_names():
    spelled = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "formats/onnx/contract.py" or rel in FOUNDATION:
            continue
        found = _literals(path) & {META, GRAPH, SESSION, "sqdeploy.onnx", "sqdeploy.ort-engine"}
        if found:
            spelled[rel] = sorted(found)
    assert spelled == {}
