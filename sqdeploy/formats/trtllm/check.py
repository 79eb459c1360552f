"""``sq-check trtllm DIR``: validate a TensorRT-LLM checkpoint without TensorRT-LLM.

TensorRT-LLM's loader fails only on missing tensors and shape mismatches, warns on
extra tensors and adopts any dtype it is given, so a typo or a wrong dtype surfaces as
a broken engine much later. This checker is stricter: config.json must parse into a
supported model (:func:`.config.parse_config`), the rank files must be exactly
``rank0 .. rank{N-1}``, every rank must hold exactly the expected names with the
expected shapes and dtypes (:func:`.names.expected_tensors`), no float tensor may hold
NaN/Inf, every scale must be > 0, vocabulary padding must be zero, replicated tensors
must be identical on every rank and duplicated K/V heads identical on the ranks that
share them. Prints a table; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.report import markdown_table, write_json_atomic
from sqdeploy.formats.trtllm.config import CheckpointSpec, parse_config
from sqdeploy.formats.trtllm.names import TensorSpec, expected_tensors, global_rows
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


def _few(names) -> str:
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
                "; ".join(filter(None, [missing and f"missing {_few(missing)}", extra and f"unexpected {_few(extra)}"])) or f"{len(got)} tensors")
        res.add(f"{r} shapes", "FAIL" if shapes else "ok", _few(shapes) if shapes else "")
        res.add(f"{r} dtypes", "FAIL" if dtypes else "ok", _few(dtypes) if dtypes else "")


def _value_problems(name: str, t: torch.Tensor, e: TensorSpec, spec: CheckpointSpec, rank: int) -> list[str]:
    if t.is_floating_point() and not torch.isfinite(t).all():
        return [f"{name} has NaN/Inf"]
    if e.kind == "scale" and not bool((t > 0).all()):
        return [f"{name} has a scale <= 0"]
    if e.kind in ("lm_head", "embed") and not e.replicated:
        real = global_rows(spec.config, spec.family.trtllm["globals"][name][0])
        pad = t[max(0, real - rank * e.shape[0]):]
        if pad.numel() and bool(pad.abs().amax() > 0):
            return [f"{name} padding rows (beyond {real}) are not zero"]
    return []


def check_values(files: list[Path], expected: dict[str, TensorSpec], spec: CheckpointSpec, res: CheckResult) -> None:
    from safetensors.torch import load_file

    first: dict[str, torch.Tensor] = {}
    diverging: list[str] = []
    for rank, path in enumerate(files):
        tensors = load_file(str(path))
        problems = []
        for name, t in tensors.items():
            e = expected.get(name)
            if e is None or tuple(t.shape) != e.shape:
                continue
            problems += _value_problems(name, t, e, spec, rank)
            if e.replicated and spec.tp > 1:
                if rank == 0:
                    first[name] = t
                elif name in first and not torch.equal(first[name], t):
                    diverging.append(name)
        res.add(f"{path.stem} values", "FAIL" if problems else "ok", _few(problems) if problems else "finite, scales > 0, padding zero")
    if spec.tp > 1:
        res.add("replicated tensors", "FAIL" if diverging else "ok",
                f"differ across ranks: {_few(set(diverging))}" if diverging else "identical on every rank")


def check_kv_duplicates(path: Path, spec: CheckpointSpec, res: CheckResult) -> None:
    """With tp > KV heads, the ranks sharing a KV head must carry identical K/V rows."""
    cfg = spec.config
    if spec.tp <= cfg.num_kv_heads:
        return
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint

    ck = TrtllmCheckpoint(path, validate=False, spec=spec)
    bad = []
    group = spec.tp // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        for name in ("k", "v"):
            ref = None
            for r in range(spec.tp):
                lin = ck.rank_linear(r, i, name)
                if r % group == 0:
                    ref = lin.dequantized()
                elif not torch.equal(ref, lin.dequantized()):
                    bad.append(f"layer {i} {name} rank {r}")
    res.add("duplicated KV heads", "FAIL" if bad else "ok", _few(bad) if bad else f"each KV head identical on its {group} ranks")


def warnings(spec: CheckpointSpec, res: CheckResult) -> None:
    raw = spec.raw
    if spec.config.position == "rope" and "rotary_base" not in raw:
        res.add("rotary_base", "warn", "missing: TensorRT-LLM uses 10000")
    if spec.quant.kv == "INT8":
        res.add("INT8 KV cache", "warn", "paged context FMHA does not support it: trtllm-build --use_paged_context_fmha disable")


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


def check_dir(path: str | Path, values: bool = True) -> CheckResult:
    path = Path(path)
    res = CheckResult()
    layout = check_layout(path, res)
    if layout is None:
        return res
    files, expected = layout
    warnings(res.spec, res)
    if values and res.ok:
        check_values(files, expected, res.spec, res)
        if res.ok:
            check_kv_duplicates(path, res.spec, res)
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sq-check trtllm", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="TensorRT-LLM checkpoint directory (config.json + rank*.safetensors)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--no-values", action="store_true", help="check config, names, shapes and dtypes only")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = check_dir(args.dir, values=not args.no_values)
    print(res.table())
    failed = sum(r[1] == "FAIL" for r in res.rows)
    print(f"\n{args.dir}: {'OK' if res.ok else f'{failed} check(s) FAILED'}")
    if args.json:
        write_json_atomic(args.json, {"dir": str(args.dir), "ok": res.ok, "checks": [dict(zip(("check", "result", "detail"), r)) for r in res.rows]})
    return 0 if res.ok else 1


if __name__ == "__main__":
    from sqdeploy.cli.common import run_cli

    sys.exit(run_cli(main))
