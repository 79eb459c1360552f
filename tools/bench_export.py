"""Export wall time and peak memory per recipe, side by side with NVIDIA ModelOpt, in one run.

Every export runs in a fresh Python process, so its peak resident memory (``ru_maxrss``)
is its own and no cache warmed by an earlier job flatters a later one. The jobs run one
after another on the same machine; compare the ratios, not the absolute seconds, when the
machine is shared.

    python tools/bench_export.py ../shared/models/tiny-code-llama --out reports/export-bench \\
        --calib ../shared/data/humaneval.jsonl.gz --modelopt \\
        --big /work/1b-llama --big-recipe w8a8-sq:alpha=0.5 --big-recipe w4a16-rtn

``--big`` shows the layer-streaming memory bound: a model (e.g. a random-initialised
1B Llama from ``python -m sqdeploy.testing.random_model llama-1b DIR``) exported with a peak
resident memory well under its own size. Writes ``bench.json``, ``bench.md`` and
``bench.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ["fp16", "w8a16-rtn", "w8a8-sq", "w8a8-sq-pertoken", "w4a16-rtn", "w4a16-awq", "w4a16-sqplus"]
MODELOPT = {"modelopt-int8-sq": "INT8_SMOOTHQUANT_CFG", "modelopt-int4-awq": "INT4_AWQ_CFG"}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _recipe(spec: str):
    """``name`` or ``name:key=json:key=json`` (recipe parameters overridden, e.g. a fixed alpha)."""
    from sqdeploy.quantize.recipes import load_recipe, parse_recipe

    name, *overrides = spec.split(":")
    base = load_recipe(name)
    if not overrides:
        return base
    params = {k: json.loads(v) for k, v in (o.split("=", 1) for o in overrides)}
    algo = {**base.to_dict()["algorithm"], **params} if isinstance(base.to_dict()["algorithm"], dict) else params
    return parse_recipe({**base.to_dict(), "name": spec.replace(":", "-").replace("=", ""), "algorithm": algo})


def job_sqdeploy(model: str, spec: str, calib: dict) -> dict:
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, result = quantize_to_dir(model, _recipe(spec), Path(tmp) / "q", Calibration(**calib), Runtime(progress=False))
        size = sum(p.stat().st_size for p in (Path(tmp) / "q").glob("*.safetensors"))
    search = result.search or {}
    return {"seconds": time.perf_counter() - t0, "search_seconds": search.get("seconds"), "alpha": search.get("plan_name"),
            "output_mib": size / 2**20}


def job_modelopt(model: str, cfg_name: str, calib: dict, device: str = "cpu", tp: int = 1, out: str | None = None) -> dict:
    """ModelOpt's own flow: load the HF model, calibrate/search, export a TensorRT-LLM checkpoint (``tp`` ranks).

    On a GPU the model is loaded in float16 on the device (ModelOpt's documented flow); on CPU in float32.
    Its steps are marked with :mod:`sqdeploy.core.phases`, so with ``SQDEPLOY_PHASES_JSON`` set the process
    leaves the same record ``sq-export`` does and ``bench_export_gpu.py`` reports both tools alike."""
    import torch

    from sqdeploy.core import phases

    phases.lap("start (imports, checks)")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from transformers import AutoModelForCausalLM

    from sqdeploy.quantize.calibration import build_calibration
    from sqdeploy.quantize.pipeline import load_tokenizer

    phases.lap("import modelopt, transformers")
    t0 = time.perf_counter()
    ids = build_calibration(load_tokenizer(Path(model)), calib["source"], calib["samples"], calib["seq_len"]).ids
    cuda = device.startswith("cuda")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float16 if cuda else torch.float32).to(device).eval()
    phases.lap("open model, tokenize calibration set")

    def forward_loop(m):
        with torch.no_grad():
            for rows in ids.split(4):
                m(rows.to(device))

    t1 = time.perf_counter()
    hf = mtq.quantize(hf, getattr(mtq, cfg_name), forward_loop)
    phases.lap("quantize (calibrate, search)")
    search = time.perf_counter() - t1
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(out) if out else Path(tmp) / "ckpt"
        export_tensorrt_llm_checkpoint(hf, "llama", torch.float16, dest, inference_tensor_parallel=tp)
        size = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    phases.lap("write trtllm")
    return {"seconds": time.perf_counter() - t0, "search_seconds": search, "alpha": None, "output_mib": size / 2**20}


def run_child(job: dict) -> dict:
    """Run one job in a fresh interpreter; its peak RSS is measured by itself at exit."""
    cmd = [sys.executable, __file__, "--job", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {**job, "error": tail[0]}
    return {**job, **json.loads(proc.stdout.strip().splitlines()[-1])}


def child_main(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    if job["tool"] == "sq-deploy":
        out = job_sqdeploy(job["model"], job["recipe"], job["calib"])
    else:
        out = job_modelopt(job["model"], MODELOPT[job["recipe"]], job["calib"], job.get("device", "cpu"), job.get("tp", 1),
                           job.get("out"))
    print(json.dumps({**out, "peak_rss_mib": _peak_rss_mib()}))


def model_mib(model: str) -> float:
    return sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) / 2**20


def report(rows: list[dict], out: Path) -> str:
    from sqdeploy.core.report import markdown_table, write_json_atomic

    write_json_atomic(out / "bench.json", rows)
    table = markdown_table(
        ["model", "tool", "recipe", "wall s", "search s", "alpha", "peak RSS MiB", "model MiB", "RSS / model", "error"],
        [[Path(r["model"]).name, r["tool"], r["recipe"], _num(r.get("seconds"), 1), _num(r.get("search_seconds"), 1),
          "" if r.get("alpha") is None else r["alpha"], _num(r.get("peak_rss_mib"), 0), _num(r["model_mib"], 0),
          _num(r["peak_rss_mib"] / r["model_mib"] if "peak_rss_mib" in r else None, 2), r.get("error", "")] for r in rows],
    )
    ratios = search_ratios(rows)
    text = f"{table}\n\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in ratios.items()) + "\n"
    (out / "bench.md").write_text(text)
    plot(rows, out / "bench.png")
    return text


def _num(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def search_ratios(rows: list[dict]) -> dict[str, float]:
    """The SmoothQuant+ alpha search against ModelOpt's AWQ (calibration + search), same machine, same run."""
    by = {(r["tool"], r["recipe"]): r for r in rows if "error" not in r}
    awq = by.get(("modelopt", "modelopt-int4-awq"))
    out = {}
    for (tool, recipe), r in by.items():
        if awq and tool == "sq-deploy" and r.get("search_seconds"):
            out[f"{recipe} alpha search / ModelOpt INT4 AWQ quantize"] = r["search_seconds"] / awq["search_seconds"]
            out[f"{recipe} whole export / ModelOpt INT4 AWQ whole export"] = r["seconds"] / awq["seconds"]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    labels = [f"{Path(r['model']).name}\n{r['recipe']}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.1), 4.5))
    a.bar(range(len(rows)), [r["seconds"] for r in rows], color=["tab:orange" if r["tool"] == "modelopt" else "tab:blue" for r in rows])
    a.set_ylabel("wall time (s)")
    b.bar(range(len(rows)), [r["peak_rss_mib"] for r in rows], label="peak RSS")
    b.scatter(range(len(rows)), [r["model_mib"] for r in rows], color="black", marker="_", s=400, label="model size")
    b.set_ylabel("MiB")
    b.legend()
    for ax in (a, b):
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job"]:
        child_main(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF model directory (the shared tiny-code-llama)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--recipe", action="append", help="recipe (name[:key=json...]); default: all built-in")
    ap.add_argument("--calib", default="humaneval")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--modelopt", action="store_true", help="also run ModelOpt INT8 SmoothQuant and INT4 AWQ")
    ap.add_argument("--big", help="a large model for the streaming-memory bound")
    ap.add_argument("--big-recipe", action="append", default=None)
    ap.add_argument("--big-calib-samples", type=int, default=16)
    ap.add_argument("--big-calib-seq-len", type=int, default=256)
    ap.add_argument("--only-big", action="store_true", help="run only the --big jobs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from sqdeploy.core.output import check_output_dir

    check_output_dir(args.out, args.force)
    calib = {"source": args.calib, "samples": args.calib_samples, "seq_len": args.calib_seq_len}
    jobs = [{"tool": "sq-deploy", "model": args.model, "recipe": r, "calib": calib} for r in args.recipe or RECIPES]
    if args.only_big:
        jobs = []
    if args.modelopt and not args.only_big:
        jobs += [{"tool": "modelopt", "model": args.model, "recipe": r, "calib": calib} for r in MODELOPT]
    if args.big:
        big_calib = {**calib, "samples": args.big_calib_samples, "seq_len": args.big_calib_seq_len}
        jobs += [{"tool": "sq-deploy", "model": args.big, "recipe": r, "calib": big_calib}
                 for r in args.big_recipe or ["w8a8-sq:alpha=0.5", "w4a16-rtn"]]
    rows = []
    for n, job in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {job['tool']} {job['recipe']} on {Path(job['model']).name} ...", flush=True)
        row = run_child({**job, "threads": args.threads})
        row["model_mib"] = model_mib(job["model"])
        rows.append(row)
        print(f"    {row.get('error') or '%.1f s, peak %.0f MiB' % (row['seconds'], row['peak_rss_mib'])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print(report(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
