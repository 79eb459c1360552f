"""sq-build: engines (TensorRT-LLM, TensorRT, ONNX Runtime), memory plans and Triton repositories.

  sq-build --engine trtllm CKPT_DIR --out ENGINE_DIR [--gpu a100-80g] [--dry-run]
  sq-build --engine tensorrt ONNX_DIR --out ENGINE_DIR [--dry-run]
  sq-build --engine onnxruntime ONNX_DIR --out ENGINE_DIR [--provider cpu|cuda]
  sq-build --plan MODEL_OR_CKPT [--recipe R] [--tp N|auto] [--gpu a100-40g]
  sq-build --triton ENGINE_OR_EXPORT_DIR --out MODEL_REPO
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sqdeploy.cli.common import run_cli
from sqdeploy.core.report import markdown_table, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    from sqdeploy.engines.gpus import DEFAULT_GPU, GPU_PROFILES

    ap = argparse.ArgumentParser(prog="sq-build", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--engine", choices=["trtllm", "tensorrt", "onnxruntime"], help="build this kind of engine from SOURCE")
    mode.add_argument("--plan", action="store_true", help="print the GPU memory plan of SOURCE (HF model/config or TRT-LLM checkpoint)")
    mode.add_argument("--triton", action="store_true", help="write a Triton model repository for SOURCE")
    ap.add_argument("source", help="TensorRT-LLM checkpoint, ONNX export, engine directory, or model directory / config.json")
    ap.add_argument("--out", help="output directory (refused if it exists, unless --force)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the exact command; build nothing")
    ap.add_argument("--json", default=None, help="also write the plan / build report as JSON here")
    ap.add_argument("--gpu", default=DEFAULT_GPU, choices=sorted(GPU_PROFILES), help=f"target GPU profile (default {DEFAULT_GPU})")
    g = ap.add_argument_group("sequence limits (engines and plans)")
    g.add_argument("--max-batch-size", type=int, default=None, help="concurrent sequences (trtllm 64, tensorrt 8)")
    g.add_argument("--max-input-len", type=int, default=None, help="longest prompt (default: half of --max-seq-len, at most 2048)")
    g.add_argument("--max-seq-len", type=int, default=None, help="prompt + output (default: min(4096, the model's positions))")
    g.add_argument("--max-num-tokens", type=int, default=8192, help="packed tokens per iteration (trtllm)")
    g.add_argument("--kv-cache-fraction", type=float, default=0.9, help="share of the free GPU memory for the KV cache")
    g = ap.add_argument_group("--engine trtllm")
    g.add_argument("--workers", type=int, default=None, help="parallel build processes (default: one per rank)")
    g.add_argument("--tokenizer", type=Path, default=None, help="copy this model directory's tokenizer beside the engines")
    g = ap.add_argument_group("--engine tensorrt")
    g.add_argument("--precision", choices=["graph", "fp16"], default="graph", help="graph: strongly typed (default); fp16: FP16 flag for fp32 exports")
    g.add_argument("--workspace-gib", type=float, default=4.0)
    g = ap.add_argument_group("--engine onnxruntime")
    g.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--opt-level", choices=["all", "extended", "basic", "disable"], default=None,
                   help="default: the highest level whose engine matches the source graph, "
                        "from all (cpu) or extended (cuda) down")
    g.add_argument("--intra-op-threads", type=int, default=0)
    g.add_argument("--inter-op-threads", type=int, default=0)
    g.add_argument("--execution-mode", choices=["sequential", "parallel"], default="sequential")
    g = ap.add_argument_group("--plan")
    g.add_argument("--recipe", default="fp16", help="recipe of an HF model (a TRT-LLM checkpoint carries its own quantization)")
    g.add_argument("--tp", default=None, help="tensor-parallel GPUs, or 'auto' for the fewest that fit (default: the checkpoint's, else 1)")
    g.add_argument("--kv-cache", choices=["fp16", "int8"], default="fp16", help="KV-cache dtype of an HF model's plan")
    g.add_argument("--dtype", choices=["float16", "bfloat16"], default=None, help="float dtype of an HF model's plan (default: the model's, fp32 -> fp16)")
    g = ap.add_argument_group("--triton")
    g.add_argument("--no-streaming", action="store_true", help="TensorRT-LLM / LLM API: not decoupled (one response per request)")
    g.add_argument("--engine-path", default=None, help="engine or checkpoint path as the server sees it (e.g. inside a container)")
    g.add_argument("--device", choices=["gpu", "cpu"], default=None,
                   help="where the ONNX decoder runs (default: the export's device: an ONNX Runtime engine's provider; "
                        "cpu for float32 graphs, gpu for float16/bfloat16)")
    g.add_argument("--instances", type=int, default=1, help="instances of the Python models")
    return ap


def _need_out(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.out:
        ap.error("--out is required")


def _plan_then_build(plan, build, args: argparse.Namespace) -> dict:
    """Print the plan; with --dry-run stop there, else build into a temporary dir renamed at the end."""
    from sqdeploy.core.output import atomic_output_dir, check_output_dir

    print(plan.summary())
    if args.dry_run:
        return {"plan": plan.to_dict()}
    inputs = [args.source, args.tokenizer]
    check_output_dir(args.out, args.force, inputs)
    with atomic_output_dir(args.out, args.force, inputs) as tmp:
        result = build(plan, tmp)
    return {"plan": plan.to_dict(), "build": result}


def _trtllm(args: argparse.Namespace) -> dict:
    from sqdeploy.engines.gpus import get_gpu
    from sqdeploy.engines.trtllm import TrtllmOptions, plan_build, run_build

    opts = TrtllmOptions(gpu=get_gpu(args.gpu), max_batch_size=args.max_batch_size or 64, max_input_len=args.max_input_len,
                         max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                         kv_cache_fraction=args.kv_cache_fraction, workers=args.workers, tokenizer=args.tokenizer)
    return _plan_then_build(plan_build(args.source, args.out, opts), run_build, args)


def _tensorrt(args: argparse.Namespace) -> dict:
    from sqdeploy.engines.gpus import get_gpu
    from sqdeploy.engines.tensorrt import TrtOptions, build_trt, plan_trt

    opts = TrtOptions(gpu=get_gpu(args.gpu), max_batch_size=args.max_batch_size or 8, max_seq_len=args.max_seq_len,
                      max_input_len=args.max_input_len, precision=args.precision, workspace_gib=args.workspace_gib)
    return _plan_then_build(plan_trt(args.source, args.out, opts), build_trt, args)


def _onnxruntime(args: argparse.Namespace) -> dict:
    from sqdeploy.core.output import atomic_output_dir, check_output_dir
    from sqdeploy.engines.onnxruntime import OrtOptions, build_ort, plan_ort

    opts = OrtOptions(provider=args.provider, opt_level=args.opt_level, intra_op_threads=args.intra_op_threads,
                      inter_op_threads=args.inter_op_threads, execution_mode=args.execution_mode)
    plan = plan_ort(args.source, args.out, opts)
    print(plan.summary())
    if args.dry_run:
        return {"plan": plan.session_json()}
    inputs = [args.source, args.tokenizer]
    check_output_dir(args.out, args.force, inputs)
    with atomic_output_dir(args.out, args.force, inputs) as tmp:
        result = build_ort(plan, tmp)
    v = result["verification"]
    rows = [[r["level"], "refused", f"{r['max_rel_diff_vs_source']:.1e}", f"{r['max_rel_diff_decode_vs_full']:.1e}",
             f"{r['tolerance']:.0e}", "", ""] for r in result["refused"]]
    rows.append([result["level"], "kept", f"{v['max_rel_diff_vs_source']:.1e}", f"{v['max_rel_diff_decode_vs_full']:.1e}",
                 f"{v['tolerance']:.0e}", f"{result['nodes_before']} -> {result['nodes_after']}", result["optimize_seconds"]])
    header = ["level", "engine", "logits vs source", "decode vs full pass", "tolerance", "nodes", "optimise s"]
    print(markdown_table(header, rows))
    return result


def _plan(args: argparse.Namespace) -> dict:
    from sqdeploy.cli.plan import plan_from_args
    from sqdeploy.engines.gpus import get_gpu

    plan = plan_from_args(args.source, get_gpu(args.gpu), recipe=args.recipe, tp=args.tp, kv_cache=args.kv_cache,
                          dtype=args.dtype, max_batch_size=args.max_batch_size or 64, max_seq_len=args.max_seq_len,
                          max_num_tokens=args.max_num_tokens, kv_cache_fraction=args.kv_cache_fraction)
    print(plan.summary())
    if not plan.fits:
        plan.require_fit(str(args.source))
    return plan.to_dict()


def _triton(args: argparse.Namespace) -> dict:
    from sqdeploy.engines.triton import TritonOptions, write_repository

    opts = TritonOptions(max_batch_size=args.max_batch_size, streaming=not args.no_streaming,
                         kv_cache_fraction=args.kv_cache_fraction, instances=args.instances, engine_path=args.engine_path,
                         tokenizer=args.tokenizer, device=args.device)
    tp = int(args.tp) if args.tp and args.tp != "auto" else 1
    result = write_repository(args.source, args.out, opts, force=args.force, tp=tp)
    print(result.pop("check"))
    where = f", decoder on {result['device']} (--device to change)" if "device" in result else ""
    print(f"\nwrote {args.out} ({result['kind']}: {', '.join(result['models'])}{where}); "
          f"start the server with:\n\n  {result['launch']}\n")
    print(f"then POST /v2/models/{result['entry_model']}/{result['endpoint']}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.plan:
        report = _plan(args)
    else:
        if not args.dry_run:
            _need_out(ap, args)
        elif not args.out:
            args.out = "ENGINE_DIR"
        if args.triton:
            report = _triton(args)
        else:
            report = {"trtllm": _trtllm, "tensorrt": _tensorrt, "onnxruntime": _onnxruntime}[args.engine](args)
        if not args.dry_run:
            print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    if args.json:
        write_json_atomic(args.json, report)
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
