"""The small files that change what a directory *means*, checked against their hashes at export time.

A swapped tokenizer of the same vocabulary size, or a ``num_hidden_layers`` edited in
``config.json``, still loads and scores, just wrongly (perplexity in the thousands,
exit 0). Every output records the sha256 of its config, tokenizer and manifest files
in its output record (:data:`sqdeploy.core.output.OUTPUT_MARKER`); every reader of a
quantized, ONNX or TensorRT-LLM directory calls :func:`verify_recorded_files` and
refuses a mismatch. Directories written before the record existed get a warning.
Weights are not hashed: they are large, and a damaged weight file fails its own
checks (safetensors headers, the ONNX checker).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from sqdeploy.core.errors import SqDeployError

OUTPUT_MARKER = ".sqdeploy-output.json"  # written into every output; identifies it as replaceable, holds the hashes
TEMP_MARKER = ".sqdeploy-temp.json"  # written into every temporary directory; names its process

RECORDED = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json",
    "sqdeploy.json", "sqdeploy-onnx.json", "sqdeploy-build.json", "hf_quant_config.json",
)
MANIFESTS = ("sqdeploy.json", "sqdeploy-onnx.json", "sqdeploy-build.json")
_VERIFIED: set[tuple] = set()
_WARNED: set[Path] = set()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_files(directory: Path) -> dict[str, str]:
    """sha256 of each :data:`RECORDED` file present in ``directory``."""
    return {n: _sha256(directory / n) for n in RECORDED if (directory / n).is_file()}


def _record(directory: Path) -> dict | None:
    path = directory / OUTPUT_MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files_sha256"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise SqDeployError(f"{path} is damaged; re-export {directory}") from None
    return files


def verify_recorded_files(directory: str | Path) -> None:
    """Refuse a directory whose config, tokenizer or manifest differs from the one written at export."""
    directory = Path(directory)
    key = (os.path.realpath(directory),) + tuple(
        (n, st.st_mtime_ns, st.st_size) for n in RECORDED if (st := _stat(directory / n)) is not None)
    if key in _VERIFIED:
        return
    recorded = _record(directory)
    if recorded is None:
        if any((directory / m).is_file() for m in MANIFESTS) and not _in_progress(directory) and directory not in _WARNED:
            _WARNED.add(directory)
            print(f"warning: {directory} has no record of its files' hashes (written by an older sq-deploy); "
                  "its tokenizer and config cannot be checked against the export", file=sys.stderr)
        return
    present = record_files(directory)
    for name in sorted(set(recorded) | set(present)):
        if name not in present:
            raise SqDeployError(f"{directory / name} was removed after the export; restore it or re-export {directory}")
        if name not in recorded:
            raise SqDeployError(f"{directory / name} was added after the export and may change the model; "
                                f"remove it or re-export {directory}")
        if present[name] != recorded[name]:
            raise SqDeployError(f"{directory / name} differs from the file written at export (sha256 "
                                f"{present[name][:12]}, recorded {recorded[name][:12]}); restore it or re-export {directory}")
    _VERIFIED.add(key)


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


def _in_progress(directory: Path) -> bool:
    """Inside an output still being written (no record yet) or a scratch directory."""
    return any((p / TEMP_MARKER).is_file() for p in directory.resolve().parents)
