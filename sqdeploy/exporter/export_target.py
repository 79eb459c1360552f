"""``sq-export --target T``: quantize (or reuse a quantized directory), then write the target."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..cli.common import calibration_from, runtime_from
from ..output import atomic_output_dir
from .pipeline import QuantizeResult, quantize_to_dir
from .qmodel import QuantizedModel, is_quantized_dir
from .recipes import load_recipe
from .targets import get_target


def export_target(args: argparse.Namespace, on_quantized: Callable[[QuantizeResult], None] | None = None) -> dict:
    """Returns the target's report (with a ``summary`` string to print); ``on_quantized`` receives
    the quantization's result when the export starts from a float model (for its per-layer summary)."""
    target = get_target(args.target)
    t0 = time.perf_counter()
    scratch = None
    try:
        if is_quantized_dir(args.model):
            qdir = Path(args.model)
            target.precheck(QuantizedModel(qdir), args)
        else:
            from ..model.checkpoint import HFCheckpoint

            ck = HFCheckpoint(args.model)
            target.precheck((load_recipe(args.recipe), ck.config, ck.family), args)
            scratch = Path(tempfile.mkdtemp(prefix="sqdeploy-quantized-"))
            qdir, result = quantize_to_dir(ck.path, args.recipe, scratch / "quantized", calibration_from(args),
                                           runtime_from(args))
            if on_quantized is not None:
                on_quantized(result)
        with atomic_output_dir(args.out, args.force) as tmp:
            report = target.write(qdir, tmp, args)
        report.setdefault("seconds", round(time.perf_counter() - t0, 2))
        return report
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
