"""``sq-check trtllm DIR``: validate a TensorRT-LLM checkpoint without TensorRT-LLM.

TensorRT-LLM's loader fails only on missing tensors and shape mismatches, warns on
extra tensors and adopts any dtype it is given, so a typo or a wrong dtype surfaces as
a broken engine much later. This checker is stricter: config.json must parse into a
supported model (:func:`.config.parse_config`), the rank files must be exactly
``rank0 .. rank{N-1}``, every rank must hold exactly the expected names with the
expected shapes and dtypes (:func:`.names.expected_tensors`), no float tensor may hold
NaN/Inf, every scale must be > 0, vocabulary padding must be zero, replicated tensors
must be identical on every rank and duplicated K/V heads identical on the ranks that
share them, and a padded MLP's padding (rows and columns beyond
``producer.unpadded_intermediate_size``) zero. Prints a table; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sqdeploy.core.report import write_json_atomic
from sqdeploy.formats.trtllm.config import CheckpointSpec
from sqdeploy.formats.trtllm.layout import SHOW, CheckResult, check_layout, few  # noqa: F401 - CheckResult is part of this module's API
from sqdeploy.formats.trtllm.names import TensorSpec, global_rows


def _value_problems(name: str, t: torch.Tensor, e: TensorSpec, spec: CheckpointSpec, rank: int) -> list[str]:
    if t.is_floating_point() and not torch.isfinite(t).all():
        return [f"{name} has NaN/Inf"]
    if e.kind == "scale" and not bool((t > 0).all()):
        return [f"{name} has a scale <= 0"]
    if e.kind in ("lm_head", "embed") and not e.replicated:
        real = global_rows(spec.config, spec.family.trtllm.globals[name][0])
        pad = t[max(0, real - rank * e.shape[0]):]
        if pad.numel() and bool(pad.abs().amax() > 0):
            return [f"{name} padding rows (beyond {real}) are not zero"]
    return []


def check_values(files: list[Path], expected: dict[str, TensorSpec], spec: CheckpointSpec, res: CheckResult) -> None:
    from sqdeploy.formats.trtllm.stream import iter_tensors

    first: dict[str, torch.Tensor] = {}
    diverging: list[str] = []
    for rank, path in enumerate(files):
        problems = []
        for name, t in iter_tensors(path):  # one tensor in memory at a time, not the whole rank file
            e = expected.get(name)
            if e is None or tuple(t.shape) != e.shape:
                continue
            problems += _value_problems(name, t, e, spec, rank)
            if e.replicated and spec.tp > 1:
                if rank == 0:
                    first[name] = t
                elif name in first and not torch.equal(first[name], t):
                    diverging.append(name)
        res.add(f"{path.stem} values", "FAIL" if problems else "ok", few(problems) if problems else "finite, scales > 0, padding zero")
    if spec.tp > 1:
        res.add("replicated tensors", "FAIL" if diverging else "ok",
                f"differ across ranks: {few(set(diverging))}" if diverging else "identical on every rank")


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
    res.add("duplicated KV heads", "FAIL" if bad else "ok", few(bad) if bad else f"each KV head identical on its {group} ranks")


def check_mlp_padding(path: Path, spec: CheckpointSpec, res: CheckResult) -> None:
    """A padded MLP (``producer.unpadded_intermediate_size``) must compute exactly what the real
    one does: gate/up rows and down columns beyond the real width dequantize to 0 (and their
    bias is 0), so padded activations are 0 and add nothing."""
    real = spec.unpadded_intermediate
    if real is None:
        return
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
    from sqdeploy.formats.trtllm.shard import MLP_COLUMN, MLP_ROW

    ck = TrtllmCheckpoint(path, validate=False, spec=spec)
    cfg, bad = spec.config, []
    n = cfg.intermediate_size // spec.tp
    for i in range(cfg.num_layers):
        for r in range(spec.tp):
            first = max(0, real - r * n)  # this rank's first padded row / column
            if first >= n:
                continue
            for name in [m for m in MLP_COLUMN if m in cfg.linears]:
                lin = ck.rank_linear(r, i, name)
                if bool(lin.dequantized()[first:].any()) or (lin.bias is not None and bool(lin.bias[first:].any())):
                    bad.append(f"layer {i} {name} rank {r}")
            if bool(ck.rank_linear(r, i, MLP_ROW).dequantized()[:, first:].any()):
                bad.append(f"layer {i} {MLP_ROW} rank {r}")
    detail = f"intermediate {real} padded to {cfg.intermediate_size}: "
    res.add("MLP padding", "FAIL" if bad else "ok", detail + (f"nonzero padding in {few(bad)}" if bad else "padded rows and columns are zero"))


def warnings(spec: CheckpointSpec, res: CheckResult) -> None:
    raw = spec.raw
    if spec.config.position == "rope" and "rotary_base" not in raw:
        res.add("rotary_base", "warn", "missing: TensorRT-LLM uses 10000")
    if spec.quant.kv == "INT8":
        res.add("INT8 KV cache", "warn", "paged context FMHA does not support it: trtllm-build --use_paged_context_fmha disable")


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
        if res.ok:
            check_mlp_padding(path, res.spec, res)
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
