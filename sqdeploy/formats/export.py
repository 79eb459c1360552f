"""``sq-export --target T``: quantize (or reuse a quantized directory), then write the target."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Callable

from sqdeploy.core import phases
from sqdeploy.core.output import atomic_output_dir, output_lock, scratch_dir
from sqdeploy.formats.targets import get_target
from sqdeploy.quantize.pipeline import Calibration, QuantizeResult, Runtime, check_resources, quantize_to_dir
from sqdeploy.quantize.preflight import MARGIN, check_disk
from sqdeploy.quantize.qmodel import QuantizedModel, is_quantized_dir
from sqdeploy.quantize.recipes import load_recipe


def export_target(args: argparse.Namespace, calibration: Calibration, runtime: Runtime,
                  on_quantized: Callable[[QuantizeResult], None] | None = None) -> dict:
    """Returns the target's report (with a ``summary`` string to print); ``on_quantized`` receives
    the quantization's result when the export starts from a float model (for its per-layer summary)."""
    target = get_target(args.target)
    t0 = time.perf_counter()
    inputs = [args.model, getattr(args, "calib", None)]
    # the intermediate quantized model lives beside --out (same disk, cleaned up however the run ends)
    with output_lock(args.out), contextlib.ExitStack() as stack:
        if is_quantized_dir(args.model):
            qdir = Path(args.model)
            target.precheck(QuantizedModel(qdir), args)
            check_disk(args.out, int(sum(f.stat().st_size for f in qdir.rglob("*") if f.is_file()) * target_copies(args) * MARGIN))
        else:
            from sqdeploy.model.checkpoint import HFCheckpoint

            ck = HFCheckpoint(args.model)
            recipe = load_recipe(args.recipe)
            target.precheck((recipe, ck.config, ck.family), args)
            check_resources(ck, recipe, args.out, calibration, runtime, target_copies(args))
            scratch = stack.enter_context(scratch_dir(args.out, "quantized"))
            qdir, result = quantize_to_dir(ck.path, args.recipe, scratch, calibration, runtime)
            if on_quantized is not None:
                on_quantized(result)
        with atomic_output_dir(args.out, args.force, inputs=inputs) as tmp:
            phases.lap("start (imports, checks)")
            phases.section(f"write {target.name}")
            report = target.write(qdir, tmp, args)
            phases.lap()
        phases.lap("move output into place")
    report.setdefault("seconds", round(time.perf_counter() - t0, 2))
    return report


def target_copies(args: argparse.Namespace) -> float:
    """The export's size in quantized models: the ONNX export keeps a reference copy of the quantized
    model unless --no-reference-copy (or a quantized directory is exported)."""
    if args.target == "onnx" and not getattr(args, "no_reference_copy", False) and not is_quantized_dir(args.model):
        return 2.0
    return 1.0
