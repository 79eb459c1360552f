"""The README's quality table, regenerated: every shipped recipe on both shared models, in one run.

For each model, the float model and every recipe (calibrated on the HumanEval prompts) are
scored on the 24 standard windows of 512 tokens of the model's held-out code and on the
validation windows (``--validation-windows`` windows at offset 0.5, disjoint from the
standard ones: the windows recipe settings are chosen on). Every change comes with its
paired standard error over the windows; each INT4 recipe is also compared with
round-to-nearest, and a searched smoothing reports its chosen plan with the held-apart
scores of the plan and of not smoothing. Every searched W8A8 SmoothQuant recipe is also
scored against the simple baselines it must never lose to, with its other settings unchanged:
no smoothing, and SmoothQuant's alpha 0.5 on the norm groups and up->down (the paper's sites);
every INT4 recipe against round-to-nearest. Writes ``quality.json`` (with every window's NLL)
and ``quality.md`` into ``--out`` with the commit, machine, date and command, and with
``--readme`` rewrites the README's quality table (between its ``quality-table`` markers)
from the same data, so the README never quotes a figure this script did not produce.

    python tools/quality.py --out docs/benchmarks --readme README.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"llama": "tiny-code-llama", "qwen2": "tiny-code-qwen2"}
GOALS = {  # perplexity on the standard windows each recipe should reach
    "llama": {"w8a8-sq": 7.4498, "w8a8-sq-pertoken": 7.437, "w4a16-sqplus": 7.4721},
    "qwen2": {"w8a8-sq": 9.4900, "w8a8-sq-pertoken": 9.4811, "w4a16-sqplus": 9.5000},
}
REFERENCE_TOOLS = {"modelopt": "NVIDIA ModelOpt", "llmcompressor": "llm-compressor"}
README_ROWS = ("w8a8-sq", "w8a8-sq-pertoken", "w8a16-rtn", "w4a16-rtn", "w4a16-awq", "w4a16-sqplus")
README_MARKERS = ("<!-- quality-table:start (tools/quality.py --readme) -->", "<!-- quality-table:end -->")
NO_SMOOTHING, ALPHA_05 = "no smoothing", "alpha 0.5, norms + up->down"
# the user's alternatives, scored on the same windows where installed: row name -> ModelOpt config
MODELOPT_ROWS = {"modelopt:int8-smoothquant": "INT8_SMOOTHQUANT_CFG", "modelopt:int4-awq": "INT4_AWQ_CFG"}


class _HFLogits(torch.nn.Module):
    """A Hugging Face causal LM seen as ``ids -> logits`` (what the scoring functions call)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(ids).logits


def modelopt_model(model_dir: Path, cfg_name: str, calib_path: Path):
    """ModelOpt's own flow on the CPU, as its documentation gives it: the float32 HF model, ``mtq.quantize``
    with the config and a forward loop over the same calibration blocks the recipes use (128 x 512 of the
    HumanEval prompts); the fake-quantized model it returns is what is scored."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from sqdeploy.quantize.calibration import build_calibration
    from sqdeploy.quantize.pipeline import load_tokenizer

    ids = build_calibration(load_tokenizer(model_dir), str(calib_path), 128, 512).ids
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def forward_loop(m):
        with torch.no_grad():
            for rows in ids.split(4):
                m(rows)

    return _HFLogits(mtq.quantize(hf, getattr(mtq, cfg_name), forward_loop)).eval()


def baselines(spec: str, model_dir: Path) -> dict[str, str]:
    """The simple baselines a recipe must never be worse than, as recipe specs: for a W8A8 SmoothQuant recipe
    whose smoothing is searched, the same recipe without smoothing and with SmoothQuant's alpha 0.5 on the
    norm -> linear groups and the linear -> linear group (up->down); for an INT4 recipe, round-to-nearest.
    Every other setting (rounding, calibration) stays the recipe's, so the comparison isolates the smoothing."""
    from sqdeploy.core.families import family_for_hf_config
    from sqdeploy.quantize.recipes import load_recipe

    if spec.startswith("w4a16-") and spec != "w4a16-rtn":
        return {"round to nearest": "w4a16-rtn"}
    recipe = load_recipe(spec)
    if recipe.algorithm != "smoothquant" or recipe.params.get("alpha") != "search" or not recipe.scheme.act.quantized:
        return {}
    family = family_for_hf_config(json.loads((model_dir / "config.json").read_text()))
    groups = [g.name for g in family.smoothing_groups if g.kind in ("norm", "linear")]
    return {NO_SMOOTHING: f"{spec}:alpha=null",
            ALPHA_05: f"{spec}:alpha=0.5:smoothing_groups={json.dumps(groups, separators=(',', ':'))}"}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": load}


def commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def score(model, windows) -> dict:
    from sqdeploy.evaluate.perplexity import model_logits_fn, perplexity

    p = perplexity(model_logits_fn(model), windows)
    return {"perplexity": p.ppl, "per_window_nll": p.per_window_nll}


def change(base: dict, other: dict) -> dict:
    from sqdeploy.evaluate.perplexity import paired_change

    c = paired_change(base["per_window_nll"], other["per_window_nll"])
    return {"relative": c.relative, "stderr": c.stderr, "text": str(c)}


def search_summary(search: dict | None) -> dict | None:
    if not search:
        return None
    return {"plan": search["plan"], "plan_name": search["plan_name"], "rounding": search["rounding"], "chosen": search["chosen"],
            "unsmoothed": search["unsmoothed"], "calibration": search["calibration"], "seconds": search["seconds"],
            "scores": search["scores"], "rtn_scores": search.get("rtn_scores")}


def humaneval_settings(args) -> dict:
    if not args.humaneval:
        return {"run": False}
    from sqdeploy.evaluate.humaneval import load_problems

    n = len(load_problems())
    return {"run": True, "problems": n, "limit": args.humaneval_limit, "generated": min(n, args.humaneval_limit or n),
            "max_new_tokens": args.humaneval_max_new_tokens}


def model_windows(key: str, args) -> dict:
    """The standard and validation windows of a model's held-out text (tokenized once)."""
    from sqdeploy.evaluate.perplexity import eval_windows, read_text
    from sqdeploy.quantize.pipeline import load_tokenizer

    shared = Path(args.shared)
    tok = load_tokenizer(shared / "models" / MODELS[key])
    text = read_text(shared / "data" / f"heldout-code-{key}.txt.gz")
    ids = tok(text, add_special_tokens=False).input_ids
    tok_once = lambda _text, **_kw: type("Tokens", (), {"input_ids": ids})  # noqa: E731 - eval_windows tokenizes once per call
    sets = {"standard": eval_windows(tok_once, text, args.standard_windows, 512, 0.0)}
    if args.validation_windows:
        sets["validation"] = eval_windows(tok_once, text, args.validation_windows, 512, 0.5)
    return sets


def job(key: str, spec: str | None, sets: dict, shared: str, humaneval: dict | None, threads: int) -> dict:
    """One row: the float model (``spec`` None) or a recipe, scored on every window set (in a worker process)."""
    import torch

    from sqdeploy.model import HFCheckpoint, load_model
    from sqdeploy.quantize.pipeline import Calibration, Runtime, load_tokenizer, quantize_in_memory

    torch.set_num_threads(threads)
    ck = HFCheckpoint(Path(shared) / "models" / MODELS[key])
    row: dict = {"recipe": spec or "float32 (unquantized)"}
    t0 = time.perf_counter()
    if spec is None:
        model = load_model(ck)
    elif spec in MODELOPT_ROWS:
        model = modelopt_model(ck.path, MODELOPT_ROWS[spec], Path(shared) / "data" / "humaneval.jsonl.gz")
        row.update(quantize_seconds=time.perf_counter() - t0, reference="NVIDIA ModelOpt " + _version("nvidia-modelopt"))
    else:
        cal = Calibration(str(Path(shared) / "data" / "humaneval.jsonl.gz"))
        model, result = quantize_in_memory(ck, spec, cal, Runtime(progress=False))
        row.update(quantize_seconds=time.perf_counter() - t0, resolved=result.recipe.to_dict(),
                   calibration=result.calibration, search=search_summary(result.search))
    for s, w in sets.items():
        t1 = time.perf_counter()
        row[s] = score(model, w)
        row[s]["eval_seconds"] = time.perf_counter() - t1
    if humaneval is not None:
        row["humaneval"] = score_humaneval(model, load_tokenizer(ck.path), **humaneval)
    return row


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def score_humaneval(model, tokenizer, limit: int | None, max_new_tokens: int, data: str | None = None) -> dict:
    """The canonical solutions' NLL on every problem, greedy pass@1 (with the completions) on the first ``limit``."""
    from sqdeploy.evaluate.humaneval import canonical_solution_nll, humaneval_pass_at_1, load_problems

    problems = load_problems(None, data)
    t0 = time.perf_counter()
    out = {"canonical": canonical_solution_nll(model, tokenizer, problems)}
    out["canonical"]["eval_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["generation"] = humaneval_pass_at_1(model, tokenizer, max_new_tokens=max_new_tokens, problems=problems[:limit])
    out["generation"]["eval_seconds"] = time.perf_counter() - t0
    return out


def assemble(key: str, specs: list[str], done: dict, base_specs: dict | None = None) -> list[dict]:
    """A model's rows in table order (float first), each with its paired changes against float and RTN, and
    against its simple baselines (``base_specs``: recipe -> {label: baseline spec}) with the verdict."""
    rows = [done[(key, s)] for s in [None, *specs] if (key, s) in done]
    base = done.get((key, None))
    rtn = done.get((key, "w4a16-rtn"))
    for row in rows:
        if row is base or "error" in row:
            continue
        for s in ("standard", "validation"):
            if s not in row:
                continue
            if base is not None and s in base:
                row[s]["vs_float"] = change(base[s], row[s])
            if rtn is not None and s in rtn and row["recipe"].startswith("w4a16-") and row is not rtn:
                row[s]["vs_w4a16_rtn"] = change(rtn[s], row[s])
            compared = {}
            for label, spec in (base_specs or {}).get(row["recipe"], {}).items():
                other = done.get((key, spec))
                if other is not None and s in other:
                    compared[label] = {"spec": spec, "perplexity": other[s]["perplexity"], "change": change(other[s], row[s])}
            if compared:
                row[s]["vs_baselines"] = compared
                row[s]["never_worse"] = row[s]["perplexity"] <= min(c["perplexity"] for c in compared.values())
        if base is not None and "humaneval" in row and "humaneval" in base:
            from sqdeploy.evaluate.humaneval import agreement

            he, ref = row["humaneval"], base["humaneval"]
            he["canonical"]["vs_float"] = change({"per_window_nll": ref["canonical"]["per_problem_nll"]},
                                                 {"per_window_nll": he["canonical"]["per_problem_nll"]})
            he["generation"]["same_as_float"] = agreement(ref["generation"], he["generation"])
    return rows


def fmt_change(row: dict, s: str, key: str = "vs_float") -> str:
    c = row.get(s, {}).get(key)
    return "" if c is None else c["text"]


def markdown(data: dict) -> str:
    from sqdeploy.core.report import markdown_table

    s = data["settings"]
    lines = [
        "# Quality of every shipped recipe on the shared models",
        "",
        f"Generated by `{data['command']}` on commit `{data['commit']['commit'][:12]}`"
        + (" (with uncommitted changes)" if data["commit"]["dirty"] else "")
        + f", {data['date']}, {data['machine']['cpu']} ({data['machine']['cores']} cores, torch {data['machine']['torch']}).",
        "",
        f"Perplexity on {s['standard_windows']} standard windows x 512 tokens of each model's held-out code"
        + (f" and on {s['validation_windows']} validation windows (offset 0.5, disjoint from the standard ones)"
           if s["validation_windows"] else "")
        + "; calibration on the HumanEval prompts. Every change is against the float model on the same windows,"
        " with its paired standard error; INT4 recipes also against `w4a16-rtn`.",
    ]
    if s["validation_windows"] and s["validation_windows"] < 240:
        lines.append(f"The validation set here has {s['validation_windows']} windows, not the 240 that settings are"
                     " chosen on: fewer to fit the run into the time available on this machine.")
    he = data["humaneval"]
    he_text = ("not run (pass --humaneval)" if not he.get("run") else
               f"canonical-solution NLL on all {he['problems']} problems; greedy completions (at most"
               f" {he['max_new_tokens']} new tokens, from the prompt without its trailing newline, cut at the first line"
               f" at column 0 or stop string) on " + ("all of them" if he["limit"] is None else
               f"the first {he['generated']} (`--humaneval-limit {he['limit']}`, to fit the run into the time available"
               " on this machine)"))
    lines += ["", f"Reference tools: {data['references']}.", f"HumanEval: {he_text}.", ""]
    if not data.get("complete"):
        lines += ["**Partial: the run has not finished (or was stopped); the rows below are those done so far.**", ""]
    for key, m in data["models"].items():
        lines += [f"## {MODELS[key]}", ""]
        has_val = s["validation_windows"] > 0
        head = ["recipe", "standard", "vs float", "vs w4a16-rtn"]
        if has_val:
            head += ["validation", "vs float (val.)", "vs w4a16-rtn (val.)"]
        head += ["goal (standard)", "quantize s"]
        table = []
        for r in m["rows"]:
            if "error" in r:
                table.append([r["recipe"], f"failed: {r['error']}"] + [""] * (len(head) - 2))
                continue
            goal = GOALS.get(key, {}).get(r["recipe"])
            ppl = r["standard"]["perplexity"]
            cells = [f"`{r['recipe']}`" if r.get("resolved") else r["recipe"], round(ppl, 4),
                     fmt_change(r, "standard"), fmt_change(r, "standard", "vs_w4a16_rtn")]
            if has_val:
                cells += [round(r["validation"]["perplexity"], 4), fmt_change(r, "validation"),
                          fmt_change(r, "validation", "vs_w4a16_rtn")]
            cells += ["" if goal is None else f"<= {goal}: {'met' if ppl <= goal else f'missed by {ppl - goal:.4f}'}",
                      round(r.get("quantize_seconds", 0.0), 1)]
            table.append(cells)
        lines += [markdown_table(head, table), ""]
        lines += baselines_table(m["rows"], s["validation_windows"] > 0)
        he_rows = [r for r in m["rows"] if "humaneval" in r]
        if he_rows:
            lines += humaneval_table(he_rows)
        searched = [r for r in m["rows"] if r.get("search")]
        for r in searched:
            if r["search"]["calibration"].get("fallback"):
                lines.append(f"`{r['recipe']}`: {r['search']['calibration']['fallback']}.")
        if searched:
            lines += ["Searched smoothing (KL of the quantized model from the float one on the held-apart"
                      " calibration sequences, chosen plan vs no smoothing):", ""]
            lines += [markdown_table(["recipe", "plan", "rounding", "KL chosen", "KL unsmoothed", "search s"], [
                [f"`{r['recipe']}`", r["search"]["plan_name"], r["search"]["rounding"], f"{r['search']['chosen']['kl']:.3e}",
                 f"{r['search']['unsmoothed']['kl']:.3e}", round(r["search"]["seconds"], 1)] for r in searched]), ""]
    return "\n".join(lines) + "\n"


def baselines_table(rows: list[dict], has_val: bool) -> list[str]:
    """Each recipe against the simple baselines it must never be worse than, on both window sets."""
    from sqdeploy.core.report import markdown_table

    table = []
    for r in rows:
        for s in ("standard", "validation") if has_val else ("standard",):
            vs = r.get(s, {}).get("vs_baselines")
            if not vs:
                continue
            table.append([f"`{r['recipe']}`", s, round(r[s]["perplexity"], 4),
                          "; ".join(f"{label} ({'`' + c['spec'] + '`'}): {c['perplexity']:.4f}, recipe {c['change']['text']}"
                                    for label, c in vs.items()),
                          "yes" if r[s]["never_worse"] else "**no**"])
    if not table:
        return []
    return ["Against the simple baselines (same rounding and calibration, only the smoothing changed; the change is"
            " the recipe's against the baseline, with its paired standard error):", "",
            markdown_table(["recipe", "windows", "perplexity", "baselines", "at most the best baseline"], table), ""]


def readme_table(data: dict) -> str:
    """The README's quality table: standard windows, change against float, HumanEval canonical NLL, and
    whether each recipe stays at or below its simple baselines on both window sets."""
    from sqdeploy.core.report import markdown_table

    keys = list(data["models"])
    by = {k: {r["recipe"]: r for r in data["models"][k]["rows"]} for k in keys}
    head = ["recipe", *(MODELS[k] for k in keys), "HumanEval canonical NLL, " + " / ".join(keys),
            "never worse than its baselines (standard / validation), " + " / ".join(keys)]
    table = [["float32", *(f"{by[k]['float32 (unquantized)']['standard']['perplexity']:.4f}" for k in keys), "", ""]]
    for name in README_ROWS:
        rows = [by[k].get(name) for k in keys]
        if any(r is None or "error" in r for r in rows):
            continue
        cells = [f"`{name}`"]
        for r in rows:
            cells.append(f"{r['standard']['perplexity']:.4f} ({r['standard']['vs_float']['text']})")
        he = [r.get("humaneval", {}).get("canonical", {}).get("vs_float") for r in rows]
        cells.append(" / ".join(h["text"].split(" ±")[0] for h in he) if all(he) else "")
        verdicts = []
        for r in rows:
            v = [r[s]["never_worse"] for s in ("standard", "validation") if "never_worse" in r.get(s, {})]
            verdicts.append("/".join("yes" if x else "no" for x in v))
        cells.append(" · ".join(verdicts) if any(verdicts) else "")
        table.append(cells)
    for name in MODELOPT_ROWS:  # the user's alternative, on the same windows
        rows = [by[k].get(name) for k in keys]
        if all(r is not None and "error" not in r for r in rows):
            table.append([f"{rows[0].get('reference', 'NVIDIA ModelOpt')} {name.split(':', 1)[1]} (reference)",
                          *(f"{r['standard']['perplexity']:.4f} ({r['standard']['vs_float']['text']})" for r in rows), "", ""])
    return markdown_table(head, table)


def update_readme(path: Path, data: dict) -> None:
    """Replace the README's block between the quality-table markers with the table of ``data``."""
    start, end = README_MARKERS
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no quality-table markers ({start} ... {end}) to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{start}\n{readme_table(data)}\n{end}{tail}")
    tmp.replace(path)


def humaneval_table(rows: list[dict]) -> list[str]:
    """HumanEval rows: pass@1, and the two paired metrics that tell variants apart where pass@1 cannot."""
    from sqdeploy.core.report import markdown_table

    table = []
    for r in rows:
        can, gen = r["humaneval"]["canonical"], r["humaneval"]["generation"]
        same = gen.get("same_as_float")
        table.append([f"`{r['recipe']}`" if r.get("resolved") else r["recipe"],
                      f"{100 * gen['pass@1']:.1f}% ({gen['passed']}/{gen['problems']})", round(can["nll"], 4),
                      can["vs_float"]["text"] if "vs_float" in can else "",
                      "" if same is None else f"{100 * same['fraction']:.1f}% ({same['same']}/{same['problems']})",
                      round(can["eval_seconds"] + gen["eval_seconds"], 1)])
    n_can = len(rows[0]["humaneval"]["canonical"]["per_problem_nll"])
    return ["HumanEval: greedy pass@1; NLL per token of the canonical solution given its prompt (teacher-forced, mean"
            f" over {n_can} problems) with its change against float as a perplexity ratio and the paired standard error"
            " over the problems; the fraction of problems whose greedy completion equals the float model's:", "",
            markdown_table(["recipe", "pass@1", "canonical NLL", "vs float", "same completion as float", "HumanEval s"],
                           table), ""]


def main(argv: list[str] | None = None) -> int:
    from sqdeploy.quantize.recipes import builtin_recipes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/benchmarks", help="directory for quality.json and quality.md")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared models and data")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: llama, qwen2")
    ap.add_argument("--recipe", action="append", default=None,
                    help="recipe to score (repeatable; default every shipped recipe but fp16, w4a16-rtn first)")
    ap.add_argument("--extra", action="append", default=[],
                    help="another recipe to score after the others, e.g. a baseline such as w8a8-sq:alpha=null (repeatable)")
    ap.add_argument("--standard-windows", type=int, default=24)
    ap.add_argument("--validation-windows", type=int, default=240, help="0: standard windows only")
    ap.add_argument("--humaneval", action="store_true",
                    help="also HumanEval: the canonical solutions' NLL on every problem, greedy pass@1 and agreement with"
                    " float (runs generated code)")
    ap.add_argument("--humaneval-limit", type=int, default=None,
                    help="generate for the first N problems only (the canonical-solution NLL covers all 164)")
    ap.add_argument("--humaneval-max-new-tokens", type=int, default=192,
                    help="new tokens per completion (default 192: more than 97%% of the canonical solutions take)")
    ap.add_argument("--jobs", type=int, default=1, help="rows computed in parallel worker processes")
    ap.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                    help="also score each searched W8A8 recipe without smoothing and with alpha 0.5 (default on)")
    ap.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                    help="also NVIDIA ModelOpt's INT8 SmoothQuant and INT4 AWQ where it is installed (default on)")
    ap.add_argument("--readme", default=None, help="rewrite this README's quality table from the results (when complete)")
    ap.add_argument("--from-json", default=None,
                    help="no scoring: rewrite --out's Markdown and --readme's table from this quality.json")
    args = ap.parse_args(argv)
    if args.recipe is None:
        names = [n for n in builtin_recipes() if n != "fp16"]
        args.recipes = ["w4a16-rtn", *[n for n in names if n != "w4a16-rtn"]]
    else:
        args.recipes = args.recipe
    args.recipes = [*args.recipes, *args.extra]
    missing = [k for k in args.models.split(",") if k not in MODELS]
    if missing:
        ap.error(f"unknown model(s) {missing}; known: {', '.join(MODELS)}")
    out = Path(args.out)
    if args.from_json:
        return rewrite(Path(args.from_json), out, args.readme, Path(args.shared))
    keys = args.models.split(",")
    # each searched recipe's simple baselines, per model (the group names come from the model's family)
    base_specs = {k: {spec: b for spec in args.recipes if (b := baselines(spec, Path(args.shared) / "models" / MODELS[k]))}
                  if args.baselines else {} for k in keys}
    references = [*MODELOPT_ROWS] if args.references and importlib.util.find_spec("modelopt") is not None else []
    specs = {k: [*args.recipes, *dict.fromkeys(b for m in base_specs[k].values() for b in m.values()
                                               if b not in args.recipes), *references] for k in keys}
    refs = [f"{label} not installed" for mod, label in REFERENCE_TOOLS.items() if importlib.util.find_spec(mod) is None]
    if references:
        refs.insert(0, f"NVIDIA ModelOpt {_version('nvidia-modelopt')}: INT8 SmoothQuant and INT4 AWQ, its default configs,"
                       " quantized on the CPU in float32 from the same calibration blocks (rows `modelopt:*`)")
    elif importlib.util.find_spec("modelopt") is not None:
        refs.insert(0, "NVIDIA ModelOpt installed, not run (--no-references)")
    data = {
        "command": "python tools/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "commit": commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"standard_windows": args.standard_windows, "validation_windows": args.validation_windows,
                     "seq_len": 512, "calibration": "humaneval.jsonl.gz (recipe defaults: 128 x 512 requested)",
                     "recipes": args.recipes, "baselines": base_specs, "jobs": args.jobs},
        "references": "; ".join(refs),
        "humaneval": humaneval_settings(args),
        "models": {},
    }

    def save():
        data["seconds"] = time.perf_counter() - t0
        write_outputs(out, data)

    t0 = time.perf_counter()
    windows = {k: model_windows(k, args) for k in keys}
    done: dict = {}
    added = {b for k in keys for b in specs[k] if b not in args.recipes}  # baselines and references: no HumanEval
    # the searched recipes take longest: start them first; extras and baselines last
    rank = lambda r: 2 if r in args.extra or r in added else 0 if "sq" in r and "-o" not in r else 1  # noqa: E731
    jobs = sorted([(k, spec) for k in keys for spec in [None, *specs[k]]],
                  key=lambda j: (j[1] is not None, rank(j[1] or ""), keys.index(j[0])))
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else torch_threads()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        he = {"limit": args.humaneval_limit, "max_new_tokens": args.humaneval_max_new_tokens} if args.humaneval else None
        futures = {pool.submit(job, k, spec, windows[k], args.shared, None if spec in added else he, threads): (k, spec)
                   for k, spec in jobs}
        for fut in as_completed(futures):
            k, spec = futures[fut]
            try:
                done[(k, spec)] = fut.result()
            except Exception as exc:  # one failed row must not lose the others
                done[(k, spec)] = {"recipe": spec or "float32 (unquantized)", "error": f"{type(exc).__name__}: {exc}"}
                log(f"{k} {spec}: failed: {exc}")
                save()
                continue
            for key in keys:
                data["models"][key] = {"rows": assemble(key, specs[key], done, base_specs[key])}
            row = done[(k, spec)]
            log(f"{k} {row['recipe']}: " + ", ".join(f"{s} {row[s]['perplexity']:.4f}" for s in windows[k])
                + f" ({len(done)}/{len(jobs)} done)")
            save()
    data["complete"] = True
    save()
    if args.readme:
        update_readme(Path(args.readme), data)
    log(f"wrote {out / 'quality.json'} and {out / 'quality.md'} in {time.perf_counter() - t0:.0f} s"
        + (f"; rewrote the quality table of {args.readme}" if args.readme else ""))
    return 0


def write_outputs(out: Path, data: dict) -> None:
    from sqdeploy.core.report import write_json_atomic

    write_json_atomic(out / "quality.json", data)
    tmp = out / ".quality.md.tmp"
    tmp.write_text(markdown(data))
    tmp.replace(out / "quality.md")


def rewrite(source: Path, out: Path, readme: str | None, shared: Path) -> int:
    """Re-derive the comparisons, the Markdown and the README table from a finished run's JSON (no scoring)."""
    data = json.loads(source.read_text())
    base_specs = data["settings"].get("baselines")
    if base_specs is None:  # a run from before the baselines: compare with whichever baseline rows it has
        base_specs = {k: {r["recipe"]: b for r in m["rows"] if "resolved" in r
                          and (b := baselines(r["recipe"], shared / "models" / MODELS[k]))} for k, m in data["models"].items()}
    for key, m in data["models"].items():
        done = {(key, None if "resolved" not in r and r["recipe"].startswith("float32") else r["recipe"]): r for r in m["rows"]}
        specs = [r["recipe"] for r in m["rows"] if not r["recipe"].startswith("float32")]
        m["rows"] = assemble(key, specs, done, base_specs.get(key, {}))
    write_outputs(out, data)
    if readme:
        update_readme(Path(readme), data)
    log(f"rewrote {out / 'quality.md'}" + (f" and the quality table of {readme}" if readme else "") + f" from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
