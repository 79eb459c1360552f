"""Perplexity sweep of the TensorRT-LLM target on a model: every recipe, tp 1 and 2, read back.

For each recipe the quantized directory is scored (exactly what ``sq-eval --recipe``
scores: the in-memory and on-disk models are bit-identical), then its TensorRT-LLM
checkpoints at each possible tp are written and scored through the reference reader.
Asymmetric INT4 recipes are exported twice: re-quantized symmetric (the default) and
with zero points (``--int4-zero-point``, experimental). Checkpoints made by other
tools (ModelOpt) can be scored alongside with ``--extra NAME=DIR``.

    python tools/trtllm_sweep.py ../shared/models/tiny-code-llama --work /tmp/sweep \\
        --text ../shared/data/heldout-code-llama.txt.gz --calib ../shared/data/humaneval.jsonl.gz \\
        --extra "ModelOpt INT8 SQ tp1=/tmp/mo/int8_sq-tp1" --json sweep.json --md sweep.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

RECIPES = ("fp16", "w8a8-sq", "w8a8-sq-pertoken", "w8a16-rtn", "w4a16-awq", "w4a16-sqplus")


def score(src, windows) -> float:
    from sqdeploy.exporter.evaluate import model_logits_fn, perplexity
    from sqdeploy.model.loading import load_model

    model = load_model(src, torch.float32)
    return perplexity(model_logits_fn(model), windows).ppl


def export(qdir: Path, out: Path, tp: int, zero_point: bool = False) -> dict:
    from sqdeploy.exporter.trtllm.writer import write

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = argparse.Namespace(tp=tp, pp=1, kv_cache=None, int4_zero_point=zero_point, quiet=True)
    return write(qdir, out, args)


def quantized_dir(model: Path, recipe: str, work: Path, calib: str | None) -> Path:
    from sqdeploy.exporter.pipeline import Calibration, Runtime, quantize_to_dir

    q = work / f"q-{recipe}"
    if not (q / "sqdeploy.json").exists():
        quantize_to_dir(model, recipe, q, Calibration(calib), Runtime(progress=False), force=True)
    return q


def sweep_recipe(model: Path, recipe: str, args, windows) -> list[dict]:
    from sqdeploy.errors import SqDeployError
    from sqdeploy.exporter.qmodel import QuantizedModel
    from sqdeploy.exporter.trtllm.reader import TrtllmCheckpoint

    q = quantized_dir(model, recipe, args.work, args.calib)
    qm = QuantizedModel(q)
    base = score(qm, windows)
    rows = [{"recipe": recipe, "variant": "quantized model (sq-eval)", "tp": None, "ppl": base}]
    asym = qm.scheme.weight is not None and not qm.scheme.weight.symmetric
    variants = [("", False)] + ([(" zero-point (experimental)", True)] if asym else [])
    for tp in (1, 2):
        for label, zp in variants:
            out = args.work / f"trtllm-{recipe}-tp{tp}{'-zp' if zp else ''}"
            try:
                report = export(q, out, tp, zp)
            except SqDeployError as exc:
                rows.append({"recipe": recipe, "variant": f"trtllm{label}", "tp": tp, "refused": str(exc)})
                continue
            ppl = score(TrtllmCheckpoint(out), windows)
            variant = f"trtllm {report['quant_algo']}{label}"
            if report["requantized_from"]:
                variant += f" (from {report['requantized_from']})"
            rows.append({"recipe": recipe, "variant": variant, "tp": tp, "ppl": ppl, "vs_quantized": ppl / base - 1})
    return rows


def markdown(rows: list[dict], text: str, n: int) -> str:
    from sqdeploy.report import markdown_table

    table = []
    for r in rows:
        ppl = "refused" if "refused" in r else f"{r['ppl']:.4f}"
        rel = f"{100 * r['vs_quantized']:+.3f}%" if "vs_quantized" in r else ""
        table.append([r["recipe"], r["variant"], r["tp"] or "", ppl, rel])
    head = f"perplexity on {text}, {n} windows x 512 tokens (reference reader, float32)\n\n"
    return head + markdown_table(["recipe", "checkpoint", "tp", "perplexity", "vs quantized model"], table)


def main(argv: list[str] | None = None) -> int:
    from sqdeploy.exporter.evaluate import eval_windows, read_text
    from sqdeploy.exporter.pipeline import load_tokenizer
    from sqdeploy.exporter.trtllm.reader import TrtllmCheckpoint
    from sqdeploy.report import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="quantized directories and checkpoints go here (reused)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--recipe", action="append", help=f"default: {', '.join(RECIPES)}")
    ap.add_argument("--extra", action="append", default=[], help="NAME=DIR: also score this TensorRT-LLM checkpoint")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    windows = eval_windows(load_tokenizer(args.model), read_text(args.text), args.windows, 512)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for recipe in args.recipe or RECIPES:
        rows += sweep_recipe(args.model, recipe, args, windows)
        print(markdown(rows[-1:], args.text, args.windows).splitlines()[-1], flush=True)
    for extra in args.extra:
        name, path = extra.split("=", 1)
        ck = TrtllmCheckpoint(path)
        rows.append({"recipe": name, "variant": f"{ck.quant_algo} (other producer)", "tp": ck.tp, "ppl": score(ck, windows)})
    md = markdown(rows, args.text, args.windows)
    print(md)
    if args.json:
        write_json_atomic(args.json, {"model": str(args.model), "text": args.text, "windows": args.windows, "rows": rows,
                                      "seconds": time.perf_counter() - t0})
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
