"""The export API: quantize (or reuse a quantized directory), then write a target::

    from sqdeploy.formats.export import export
    from sqdeploy.formats.onnx.options import OnnxExportOptions
    from sqdeploy.formats.trtllm.options import TrtllmOptions

    export("out/llama-w8a8", OnnxExportOptions(variant="onnxruntime"), "out/llama-onnx")
    export("models/llama", TrtllmOptions(tp=2), "out/llama-trt", recipe="w4a16-awq")

The options object picks the target (see :mod:`.targets`); ``sq-export --target T`` is this
function behind the command line's flags.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

from sqdeploy.core import phases
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.output import atomic_output_dir, output_lock, scratch_dir
from sqdeploy.formats.target import WriteContext
from sqdeploy.formats.targets import target_for
from sqdeploy.quantize.pipeline import Calibration, QuantizeResult, Runtime, check_resources, quantize_to_dir
from sqdeploy.quantize.preflight import MARGIN, check_disk
from sqdeploy.quantize.qmodel import QuantizedModel, is_quantized_dir
from sqdeploy.quantize.recipes import Recipe, load_recipe


def export(
    model: str | Path,
    options: object,
    out: str | Path,
    recipe: str | Path | Recipe | None = None,
    calibration: Calibration = Calibration(),
    runtime: Runtime = Runtime(),
    force: bool = False,
    on_quantized: Callable[[QuantizeResult], None] | None = None,
) -> dict:
    """Write ``model`` (a quantized directory, or a HF model quantized first with ``recipe``) as the
    target of ``options`` into ``out``, atomically. Returns the target's report (with a ``summary``
    string to print); ``on_quantized`` receives the quantization's result when the export starts
    from a float model (for its per-layer summary)."""
    target = target_for(options)
    t0 = time.perf_counter()
    context = WriteContext(Path(model), Path(out), runtime.progress, runtime.device)
    # the intermediate quantized model lives beside out (same disk, cleaned up however the run ends)
    with output_lock(out), contextlib.ExitStack() as stack:
        if is_quantized_dir(model):
            qdir = Path(model)
            target.precheck(QuantizedModel(qdir), options)
            check_disk(out, int(sum(f.stat().st_size for f in qdir.rglob("*") if f.is_file()) * MARGIN))
        else:
            from sqdeploy.model.checkpoint import HFCheckpoint

            if recipe is None:
                raise SqDeployError(f"{model} is not quantized: pass a recipe (e.g. recipe='w8a8-sq'), or a quantized directory")
            ck = HFCheckpoint(model)
            recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
            target.precheck((recipe, ck.config, ck.family), options)
            check_resources(ck, recipe, out, calibration, runtime, target_copies(options))
            scratch = stack.enter_context(scratch_dir(out, "quantized"))
            qdir, result = quantize_to_dir(ck.path, recipe, scratch, calibration, runtime,
                                           keep_source=target.name.startswith("trtllm"))  # it may re-quantize
            if on_quantized is not None:
                on_quantized(result)
        with atomic_output_dir(out, force, inputs=[model, calibration.source]) as tmp:
            phases.lap("start (imports, checks)")
            phases.section(f"write {target.name}")
            report = target.write(qdir, tmp, options, context)
            phases.lap()
        phases.lap("move output into place")
    report.setdefault("seconds", round(time.perf_counter() - t0, 2))
    return report


def target_copies(options: object) -> float:
    """The export's size in quantized models, beside the intermediate one: an ONNX export from a HF
    model also keeps a reference copy of the quantized model unless told not to."""
    return 2.0 if getattr(options, "reference_copy", False) else 1.0
