"""Perplexity sweep of the TensorRT-LLM target on a model: every recipe, tp 1 and 2, read back.

For each recipe the quantized directory is scored (exactly what ``sq-eval --recipe``
scores: the in-memory and on-disk models are bit-identical), then its TensorRT-LLM
checkpoints at each possible tp are written and scored through the reference reader.
Asymmetric INT4 recipes are exported re-quantized symmetric (the default; ``--requant-clip
search,none`` adds the re-quantization without clipping) and with zero points
(``--int4-zero-point``, experimental). ``--validation`` also scores every model on the 240
validation windows (``sq-eval --windows 240 --window-offset 0.5``) that recipe settings are
chosen on. Checkpoints made by other tools (ModelOpt) can be scored alongside with
``--extra NAME=DIR``.

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
VALIDATION = (240, 0.5)  # sq-eval --windows 240 --window-offset 0.5: disjoint from the standard 24


def score(src, windows: dict[str, torch.Tensor]) -> dict:
    """Perplexity on each window set (``ppl``: the standard windows, ``val_ppl``: validation)."""
    from sqdeploy.evaluate.perplexity import model_logits_fn, perplexity
    from sqdeploy.model.loading import load_model

    fn = model_logits_fn(load_model(src, torch.float32))
    return {key: perplexity(fn, w) for key, w in windows.items()}


def versus(result: dict, base: dict | None = None) -> dict:
    """A row's perplexities, and with ``base`` their paired change against it (``vs_quantized``, ``val_vs_quantized``)."""
    from sqdeploy.evaluate.perplexity import paired_change

    row = {key: p.ppl for key, p in result.items()}
    for key, p in (base or {}).items():
        change = paired_change(p.per_window_nll, result[key].per_window_nll)
        prefix = "" if key == "ppl" else "val_"
        row[f"{prefix}vs_quantized"], row[f"{prefix}vs_quantized_stderr"] = change.relative, change.stderr
    return row


def relative(row: dict, prefix: str = "") -> str:
    from sqdeploy.evaluate.perplexity import format_change

    key = f"{prefix}vs_quantized"
    return format_change(row[key], row[key + "_stderr"], 3) if key in row else ""


def export(qdir: Path, out: Path, tp: int, zero_point: bool = False, clip: str = "search") -> dict:
    from sqdeploy.formats.trtllm.options import TrtllmOptions
    from sqdeploy.formats.trtllm.writer import write

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return write(qdir, out, TrtllmOptions(tp=tp, int4_zero_point=zero_point, int4_requant_clip=clip), progress=False)


def label(recipe: str) -> str:
    """A recipe's name in file names: built-in names as they are, recipe files by their stem."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe


def quantized_dir(model: Path, recipe: str, work: Path, calib: str | None) -> Path:
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir

    q = work / f"q-{label(recipe)}"
    if not (q / "sqdeploy.json").exists():
        quantize_to_dir(model, recipe, q, Calibration(calib), Runtime(progress=False), force=True)
    return q


def sweep_recipe(model: Path, recipe: str, args, windows) -> list[dict]:
    from sqdeploy.core.errors import SqDeployError
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
    from sqdeploy.quantize.qmodel import QuantizedModel

    q = quantized_dir(model, recipe, args.work, args.calib)
    qm = QuantizedModel(q)
    base = score(qm, windows)
    rows = [{"recipe": recipe, "variant": "quantized model (sq-eval)", "tp": None, **versus(base)}]
    asym = qm.scheme.weight is not None and qm.scheme.weight.bits == 4 and not qm.scheme.weight.symmetric
    default_clip, *other_clips = args.requant_clip
    variants = [("", "", False, default_clip)]  # (label, directory suffix, zero points, clip search)
    if asym:
        variants += [(f" clip {clip}", f"-clip{clip}", False, clip) for clip in other_clips]
        variants.append((" zero-point (experimental)", "-zp", True, "search"))
    for tp in (1, 2):
        for name, suffix, zp, clip in variants:
            out = args.work / f"trtllm-{label(recipe)}-tp{tp}{suffix}"
            try:
                report = export(q, out, tp, zp, clip)
            except SqDeployError as exc:
                rows.append({"recipe": recipe, "variant": f"trtllm{name}", "tp": tp, "refused": str(exc)})
                continue
            ppl = score(TrtllmCheckpoint(out), windows)
            variant = f"trtllm {report['quant_algo'] or 'float'}{name}"
            if report["requantized_from"]:
                variant += f" (from {report['requantized_from']})"
            rows.append({"recipe": recipe, "variant": variant, "tp": tp, **versus(ppl, base)})
    return rows


def markdown(rows: list[dict], text: str, n: int, validation: bool) -> str:
    from sqdeploy.core.report import markdown_table

    table = []
    for r in rows:
        ppl = "refused" if "refused" in r else f"{r['ppl']:.4f}"
        row = [r["recipe"], r["variant"], r["tp"] or "", ppl, relative(r)]
        if validation:
            row += [f"{r['val_ppl']:.4f}" if "val_ppl" in r else "", relative(r, "val_")]
        table.append(row)
    head = f"perplexity on {text}, {n} windows x 512 tokens (reference reader, float32)"
    if validation:
        head += f"; validation: {VALIDATION[0]} windows at offset {VALIDATION[1]}"
    cols = ["recipe", "checkpoint", "tp", "perplexity", "vs quantized model (± paired s.e.)"]
    cols += ["validation", "vs quantized model"] if validation else []
    return head + "\n\n" + markdown_table(cols, table)


def clip_list(value: str) -> list[str]:
    clips = value.split(",")
    if not set(clips) <= {"search", "none"}:
        raise argparse.ArgumentTypeError("takes search and/or none, comma-separated")
    return clips


def main(argv: list[str] | None = None) -> int:
    from sqdeploy.core.report import write_json_atomic
    from sqdeploy.evaluate.perplexity import eval_windows, read_text
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
    from sqdeploy.quantize.pipeline import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="quantized directories and checkpoints go here (reused)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--validation", action="store_true", help="also score on the validation windows (240 at offset 0.5)")
    ap.add_argument("--requant-clip", type=clip_list, default=["search"],
                    help="comma-separated --int4-requant-clip values for asymmetric INT4 recipes (default: search)")
    ap.add_argument("--recipe", action="append", help=f"default: {', '.join(RECIPES)}")
    ap.add_argument("--extra", action="append", default=[], help="NAME=DIR: also score this TensorRT-LLM checkpoint")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    tok, text = load_tokenizer(args.model), read_text(args.text)
    windows = {"ppl": eval_windows(tok, text, args.windows, 512)}
    if args.validation:
        windows["val_ppl"] = eval_windows(tok, text, VALIDATION[0], 512, VALIDATION[1])
    rows: list[dict] = []
    t0 = time.perf_counter()
    for recipe in args.recipe or RECIPES:
        rows += sweep_recipe(args.model, recipe, args, windows)
        print(markdown(rows[-1:], args.text, args.windows, args.validation).splitlines()[-1], flush=True)
    for extra in args.extra:
        name, path = extra.split("=", 1)
        ck = TrtllmCheckpoint(path)
        rows.append({"recipe": name, "variant": f"{ck.quant_algo} (other producer)", "tp": ck.tp, **versus(score(ck, windows))})
    md = markdown(rows, args.text, args.windows, args.validation)
    print(md)
    if args.json:
        write_json_atomic(args.json, {"model": str(args.model), "text": args.text, "windows": args.windows,
                                      "validation": list(VALIDATION) if args.validation else None, "rows": rows,
                                      "seconds": time.perf_counter() - t0})
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
