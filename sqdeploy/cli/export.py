"""sq-export: quantize a Hugging Face model with a recipe and write it for deployment."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sqdeploy.cli.common import add_calibration_arguments, add_runtime_arguments, calibration_from, run_cli, runtime_from
from sqdeploy.cli.targets import add_target_arguments, options_from
from sqdeploy.core.report import markdown_table


def build_parser() -> argparse.ArgumentParser:
    from sqdeploy.formats.targets import load_targets

    targets = load_targets()
    ap = argparse.ArgumentParser(
        prog="sq-export",
        description="Calibrate, smooth and quantize a local Hugging Face causal LM, then write it as a "
        "quantized model directory (compressed-tensors) or an export target.",
    )
    ap.add_argument("model", nargs="?", help="local HF model directory (or hub id when online), or an existing quantized directory")
    ap.add_argument("--recipe", default="w8a8-sq", help="built-in recipe name or YAML path (see --list-recipes)")
    ap.add_argument("--out", help="output directory (refused if it exists, unless --force)")
    ap.add_argument("--target", default="quantized", choices=["quantized", *sorted(targets)], help="what to write")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--json", default=None, help="also write the export report as JSON here")
    ap.add_argument("--keep-source", action="store_true",
                    help="--target quantized, weight-only or asymmetric INT4 recipes: also keep a copy of the source weights "
                         "and the calibration set, so that a later --target trtllm needs only this directory")
    ap.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")
    add_calibration_arguments(ap)
    add_runtime_arguments(ap)
    add_target_arguments(ap)
    return ap


def list_recipes() -> None:
    from sqdeploy.quantize.recipes import builtin_recipes, load_recipe

    rows = []
    for name in builtin_recipes():
        r = load_recipe(name)
        rows.append([name, r.scheme.describe(), r.algorithm, " ".join(r.description.split())[:80]])
    print(markdown_table(["recipe", "scheme", "algorithm", "description"], rows))


def summary(result, out: Path, seconds: float) -> str:
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return f"{layer_summary(result)}\nwrote {out} ({size / 2**20:.1f} MiB) in {seconds:.1f} s"


def layer_summary(result) -> str:
    """The recipe, the searched alpha and one row per layer (also printed before an export target is written)."""
    rows = []
    for layer in result.manifest["layers"]:
        info = layer["info"]
        alpha = info.get("alpha", "")
        alpha = "off" if alpha is None else "plan (below)" if isinstance(alpha, dict) else alpha
        acc = layer["accumulated_error"]
        rows.append([layer["index"], alpha, f"{layer['error']:.2e}", "" if acc is None else f"{acc:.2e}", layer["seconds"]])
    table = markdown_table(["layer", "alpha", "layer rel. error", "accumulated rel. error", "seconds"], rows)
    head = f"\n{result.recipe.name}: {result.recipe.scheme.describe()}, {result.config.num_layers} layers"
    if result.search:
        s = result.search
        head += (f"; smoothing plan {s['plan_name']}, {s['rounding']} rounding (searched in {s['seconds']:.1f} s on {s['calibration']['held_apart']} "
                 f"held-apart sequences: KL {s['chosen']['kl']:.3e}, unsmoothed {s['unsmoothed']['kl']:.3e})")
        if s["calibration"].get("fallback"):
            head += f"\nnote: {s['calibration']['fallback']}"
    return f"{head}\n{table}"


def main(argv: list[str] | None = None) -> int:
    from sqdeploy.core.errors import SqDeployError
    from sqdeploy.core.output import check_output_dir
    from sqdeploy.core.report import write_json_atomic
    from sqdeploy.quantize.pipeline import quantize_to_dir

    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list_recipes:
        list_recipes()
        return 0
    if not args.model:
        ap.error("the model directory is required (or --list-recipes)")
    if not args.out:
        ap.error("--out is required")
    check_output_dir(args.out, args.force, inputs=[args.model, args.calib])
    t0 = time.perf_counter()
    if args.target != "quantized":
        from sqdeploy.formats.export import export

        options = options_from(args)
        report = export(args.model, options, args.out, args.recipe, calibration_from(args), runtime_from(args), args.force,
                        on_quantized=lambda result: print(layer_summary(result), flush=True))
        print(report.get("summary", ""))
        print(f"done in {time.perf_counter() - t0:.1f} s")
    else:
        from sqdeploy.quantize.qmodel import is_quantized_dir

        if is_quantized_dir(args.model):
            raise SqDeployError(f"{args.model} is already quantized; pick an export --target to convert it")
        out, result = quantize_to_dir(
            args.model, args.recipe, args.out, calibration_from(args), runtime_from(args), force=args.force,
            keep_source=args.keep_source,
        )
        report = result.manifest
        print(summary(result, out, time.perf_counter() - t0))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
