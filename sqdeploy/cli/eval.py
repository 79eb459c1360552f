"""sq-eval: perplexity (and optionally HumanEval pass@1, lm-eval tasks) of a model and its quantized variants."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sqdeploy.cli.common import add_calibration_arguments, add_runtime_arguments, calibration_from, run_cli, runtime_from
from sqdeploy.core.report import markdown_table


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sq-eval",
        description="Perplexity of a model and of each --recipe applied to it (fake-quantized with the scheme's exact "
        "arithmetic, float32), or of already quantized or exported directories, side by side on the same windows: "
        "each row's change against the first comes with its paired standard error.",
    )
    ap.add_argument("model", nargs="+",
                    help="HF model directory (with --recipe), or one or more quantized / export (onnx, trtllm) directories")
    ap.add_argument("--recipe", action="append", default=[], help="recipe to apply and score (repeatable)")
    ap.add_argument("--text", required=True, help="held-out text, .txt or .txt.gz")
    ap.add_argument("--windows", type=int, default=24, help="number of evaluation windows (default 24)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--window-offset", type=float, default=0.0,
                    help="move every window by this fraction of the window step (default 0); "
                    "--windows 48 (or 240, on a text of 0.36 M tokens or more) --window-offset 0.5 gives windows "
                    "disjoint from the default 24, for validation")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unquantized model when recipes are given")
    ap.add_argument("--humaneval", action="store_true", help="also greedy HumanEval pass@1 (runs generated code!)")
    ap.add_argument("--humaneval-limit", type=int, default=None, help="only the first N problems")
    ap.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-eval harness tasks")
    ap.add_argument("--lm-eval-include", default=None, metavar="DIR", help="directory of extra lm-eval task YAMLs (local data)")
    ap.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="only the first N documents per task")
    add_calibration_arguments(ap)
    add_runtime_arguments(ap)
    return ap


def _score(name, opened_model, logits_fn, tokenizer, windows, args, extra) -> dict:
    from sqdeploy.evaluate.perplexity import perplexity

    t0 = time.perf_counter()
    ppl = perplexity(logits_fn, windows)
    row = {"name": name, "perplexity": ppl.ppl, "nll": ppl.nll, "tokens": ppl.tokens, "per_window_nll": ppl.per_window_nll,
           "eval_seconds": time.perf_counter() - t0, **extra}
    if args.humaneval:
        if opened_model is None:
            row["humaneval"] = "not available for this directory kind"
        else:
            from sqdeploy.evaluate.humaneval import humaneval_pass_at_1

            row["humaneval"] = humaneval_pass_at_1(opened_model, tokenizer, args.humaneval_limit)
    if args.lm_eval:
        from sqdeploy.evaluate.lm_eval_adapter import run_lm_eval

        row["lm_eval"] = run_lm_eval(logits_fn, tokenizer, args.lm_eval.split(","), args.seq_len,
                                     args.lm_eval_limit, args.lm_eval_include)
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    from sqdeploy.core.errors import SqDeployError
    from sqdeploy.core.report import write_json_atomic
    from sqdeploy.evaluate.perplexity import eval_windows, model_logits_fn, paired_change, read_text
    from sqdeploy.formats.readers import open_model
    from sqdeploy.quantize.pipeline import check_tokenizer_fits, load_tokenizer, quantize_in_memory

    ap = build_parser()
    args = ap.parse_args(argv)
    if args.recipe and len(args.model) > 1:
        ap.error("--recipe quantizes one HF model: give a single model directory")
    runtime = runtime_from(args)
    rows: list[dict] = []
    if args.recipe:
        from sqdeploy.model.checkpoint import HFCheckpoint
        from sqdeploy.model.loading import load_model

        ck = HFCheckpoint(args.model[0])
        tokenizer = load_tokenizer(ck.path)
        check_tokenizer_fits(tokenizer, ck.config.vocab_size, ck.path)
        windows = eval_windows(tokenizer, read_text(args.text), args.windows, args.seq_len, args.window_offset)
        if not args.no_baseline:
            model = load_model(ck, device=runtime.device)
            rows.append(_score("float32 (unquantized)", model, model_logits_fn(model), tokenizer, windows, args, {}))
            del model
        for recipe in args.recipe:
            t0 = time.perf_counter()
            model, result = quantize_in_memory(ck, recipe, calibration_from(args), runtime)
            extra = {"recipe": result.recipe.to_dict(), "quantize_seconds": time.perf_counter() - t0}
            rows.append(_score(result.recipe.name, model, model_logits_fn(model), tokenizer, windows, args, extra))
            del model
    else:
        missing = [m for m in args.model if not Path(m).exists()]
        if missing:  # before minutes of scoring the others
            raise SqDeployError(f"{', '.join(missing)} does not exist")
        windows, text = None, read_text(args.text)
        for path in args.model:  # one at a time: only one model is in memory
            opened = open_model(path, runtime.device)
            tokenizer = load_tokenizer(opened.tokenizer_path)
            with torch.no_grad():  # the vocabulary the model scores: one token's logits
                vocab = opened.logits_fn(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
            check_tokenizer_fits(tokenizer, vocab, opened.tokenizer_path)
            ids = eval_windows(tokenizer, text, args.windows, args.seq_len, args.window_offset)
            if windows is None:
                windows = ids
            elif not torch.equal(ids, windows):
                raise SqDeployError(f"{path} tokenizes the text differently from {args.model[0]}: no paired comparison")
            rows.append(_score(f"{opened.kind}: {path}", opened.model, opened.logits_fn, tokenizer, windows, args, {}))
            del opened
    if not rows:
        raise SqDeployError("nothing to evaluate")
    table = []
    for i, r in enumerate(rows):
        change = paired_change(rows[0]["per_window_nll"], r["per_window_nll"]) if i else None
        r["delta_vs_first"] = r["perplexity"] / rows[0]["perplexity"] - 1
        r["delta_vs_first_stderr"] = None if change is None else change.stderr
        he = r.get("humaneval")
        table.append([r["name"], round(r["perplexity"], 4), "" if change is None else str(change),
                      "" if not isinstance(he, dict) else f"{100 * he['pass@1']:.1f}%",
                      round(r.get("quantize_seconds", 0.0), 1), round(r["eval_seconds"], 1)])
    offset = f", offset {args.window_offset}" if args.window_offset else ""
    print(f"\nperplexity on {args.text}: {args.windows} windows x {args.seq_len} tokens{offset}")
    print(markdown_table(["model", "perplexity", "vs first (± paired s.e.)", "HumanEval pass@1", "quantize s", "eval s"], table))
    if args.json:
        write_json_atomic(args.json, {"text": args.text, "windows": args.windows, "seq_len": args.seq_len,
                                         "window_offset": args.window_offset, "results": rows})
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
