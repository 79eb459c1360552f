"""The structural half of ``sq-check trtllm``: config.json, the rank files, and every
tensor's name, shape and dtype, read from the safetensors headers alone (no tensor data).

The read-back checkpoint (:mod:`.reader`) runs it before loading; :mod:`.check` adds the
value checks on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.report import markdown_table
from sqdeploy.formats.trtllm.config import CheckpointSpec, parse_config
from sqdeploy.formats.trtllm.names import TensorSpec, expected_tensors
from sqdeploy.model.checkpoint import read_json

ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
FLOAT_ST = ("F16", "BF16", "F32")
SHOW = 3  # names listed per failing row


@dataclass
class CheckResult:
    rows: list[list[str]] = field(default_factory=list)
    spec: CheckpointSpec | None = None

    def add(self, check: str, status: str, detail: str = "") -> None:
        self.rows.append([check, status, detail])

    @property
    def ok(self) -> bool:
        return all(r[1] != "FAIL" for r in self.rows)

    def first_failure(self) -> str:
        return next((f"{r[0]}: {r[2]}" for r in self.rows if r[1] == "FAIL"), "")

    def table(self) -> str:
        return markdown_table(["check", "result", "detail"], self.rows)


def _dtype_ok(rule: str, st: str, model: str) -> bool:
    if rule == "int8":
        return st == "I8"
    if rule == "float32":
        return st == "F32"
    if rule == "model":
        return st == ST_DTYPES[model]
    if rule == "model_or_float32":
        return st in (ST_DTYPES[model], "F32")
    return st in FLOAT_ST


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with safe_open(path, "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise SqDeployError(f"{path} is truncated or not a safetensors file ({exc}); re-export the checkpoint") from None


def few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOW]) + (f" (+{len(names) - SHOW} more)" if len(names) > SHOW else "")


def check_files(path: Path, spec: CheckpointSpec, res: CheckResult) -> list[Path]:
    want = [path / f"rank{r}.safetensors" for r in range(spec.tp)]
    present = {p.name for p in path.glob("rank*.safetensors")}
    missing = [p.name for p in want if p.name not in present]
    extra = sorted(present - {p.name for p in want})
    if missing or extra:
        res.add("rank files", "FAIL", "; ".join(filter(None, [missing and f"missing {', '.join(missing)} (world_size {spec.tp})", extra and f"unexpected {', '.join(extra)}"])))
    else:
        res.add("rank files", "ok", f"rank0..rank{spec.tp - 1}.safetensors")
    return [p for p in want if p.name in present]


def check_headers(files: list[Path], expected: dict[str, TensorSpec], spec: CheckpointSpec, res: CheckResult) -> None:
    for path in files:
        got = _headers(path)
        missing, extra = set(expected) - set(got), set(got) - set(expected)
        shapes = [f"{n} {list(got[n][0])} != {list(e.shape)}" for n, e in expected.items() if n in got and got[n][0] != e.shape]
        dtypes = [f"{n} {got[n][1]} (want {e.dtype})" for n, e in expected.items() if n in got and not _dtype_ok(e.dtype, got[n][1], spec.dtype)]
        r = path.stem
        res.add(f"{r} names", "FAIL" if missing or extra else "ok",
                "; ".join(filter(None, [missing and f"missing {few(missing)}", extra and f"unexpected {few(extra)}"])) or f"{len(got)} tensors")
        res.add(f"{r} shapes", "FAIL" if shapes else "ok", few(shapes) if shapes else "")
        res.add(f"{r} dtypes", "FAIL" if dtypes else "ok", few(dtypes) if dtypes else "")


def check_layout(path: Path, res: CheckResult) -> tuple[list[Path], dict[str, TensorSpec]] | None:
    """config.json, file set, names, shapes and dtypes; None when the config itself fails."""
    if not path.is_dir():
        raise SqDeployError(f"{path} is not a directory; pass a TensorRT-LLM checkpoint directory")
    try:
        spec = parse_config(read_json(path / "config.json", "TensorRT-LLM checkpoint"))
    except SqDeployError as exc:
        res.add("config.json", "FAIL", str(exc))
        return None
    res.spec = spec
    q = spec.quant
    res.add("config.json", "ok", f"{spec.raw['architecture']}, {spec.dtype}, quant_algo {q.algo}, kv {q.kv}, tp {spec.tp}")
    files = check_files(path, spec, res)
    expected = expected_tensors(spec)
    check_headers(files, expected, spec, res)
    return files, expected
