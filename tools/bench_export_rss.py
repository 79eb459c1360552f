"""Peak host memory of a whole ``sq-export`` (calibrate, quantize, write) against model depth.

Random float16 Llama checkpoints of one width and several depths (shards hard-linked from the
deepest, :mod:`sqdeploy.testing.random_checkpoint`) are exported from the Hugging Face model to
``--target trtllm --tp 8`` with each recipe, by each code version (``--code NAME=REPO_ROOT``,
imported through PYTHONPATH), each in a fresh process whose peak resident set is recorded
(``VmHWM`` read by the child itself at exit; ``ru_maxrss`` would start at the parent's
high-water mark). The per-layer constant is the least-squares slope of peak RSS over depth:
an export whose host memory is bounded by one layer has a slope near 0. The seconds per phase
come from ``SQDEPLOY_PHASES_JSON``. Writes ``export-rss.{json,md,png}`` into ``--out``.

    python tools/bench_export_rss.py --out docs/benchmarks --code before=../main --code after=.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_writer_rss import LAUNCH, WIDTH  # noqa: E402  (the same child launcher and model width)


def run(args: list[str], code: Path, log: Path) -> dict:
    """``sq-export ARGS`` with the code under ``code``; wall, CPU seconds, peak RSS and phases."""
    hwm, phases = log.with_suffix(".hwm"), log.with_suffix(".phases.json")
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1", "BENCH_HWM_FILE": str(hwm),
           "SQDEPLOY_PHASES_JSON": str(phases)}
    cmd = [sys.executable, "-c", LAUNCH, *args]
    t0 = time.perf_counter()
    with log.open("w") as f:
        # cwd: python puts it first on sys.path, so the child imports the code it is started from
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(code))
        _, status, ru = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"sq-export {' '.join(args)} failed ({rc}); see {log}")
    out = {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mib": round(int(hwm.read_text()) / 1024, 1),
           "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2), "minor_faults": ru.ru_minflt}
    if phases.exists():  # code that records phases
        out["phases"] = json.loads(phases.read_text()).get("phases", {})
    return out


def slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def layer_mib(hf: dict) -> dict[str, float]:
    """One decoder layer's weights in float16 and in float32 (MiB), to read the slopes against."""
    h, i = hf["hidden_size"], hf["intermediate_size"]
    kv = hf["num_key_value_heads"] * h // hf["num_attention_heads"]
    params = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return {"float16": round(params * 2 / 2**20, 1), "float32": round(params * 4 / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--code", action="append", required=True, help="NAME=REPO_ROOT (the code to measure), repeatable")
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--recipes", default="w8a8-sq,w4a16-awq")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16, help="--calib-samples")
    ap.add_argument("--seq-len", type=int, default=256, help="--calib-seq-len")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=WIDTH["hidden_size"])
    ap.add_argument("--intermediate", type=int, default=WIDTH["intermediate_size"])
    ap.add_argument("--work", default=None, help="working folder (kept; random checkpoints already there are reused)")
    args = ap.parse_args()
    from sqdeploy.core.report import markdown_table, source_revision
    from sqdeploy.testing.random_checkpoint import SMALL, random_prompts, with_layers, write_random_llama

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    depths = [int(d) for d in args.depths.split(",")]
    recipes = args.recipes.split(",")
    codes = dict(c.split("=", 1) for c in args.code)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="export-rss-"))
    hf = {**SMALL, **WIDTH, "hidden_size": args.hidden, "intermediate_size": args.intermediate}
    base = work / "base"
    if not (base / "config.json").exists():
        write_random_llama(base, hf, max(depths), device="cpu")
    calib = work / "calib.jsonl"
    if not calib.exists():
        random_prompts(calib, hf["vocab_size"], texts=max(8, args.samples * args.seq_len // 500 + 2), words=520)
    command = " ".join(["python", f"tools/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    export_args = (f"sq-export MODEL --recipe RECIPE --target trtllm --tp {args.tp} --calib calib.jsonl "
                   f"--calib-samples {args.samples} --calib-seq-len {args.seq_len} --device {args.device}")
    results: dict = {"command": command, "export": export_args, "shape": hf, "layer_mib": layer_mib(hf), "tp": args.tp,
                     "depths": depths, "recipes": recipes, "runs": {r: {n: {} for n in codes} for r in recipes}}
    rows = []
    for d in depths:
        model = with_layers(base, work / f"L{d}", d)
        for recipe in recipes:
            for name, code in codes.items():
                target = work / f"t{d}-{recipe}-{name}"
                r = run([str(model), "--recipe", recipe, "--target", "trtllm", "--tp", str(args.tp), "--out", str(target),
                         "--calib", str(calib), "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len),
                         "--device", args.device, "--quiet", "--force"], Path(code).resolve(), work / f"t{d}-{recipe}-{name}.log")
                results["runs"][recipe][name][d] = r
                rows.append([recipe, d, name, r["peak_rss_mib"], r["wall_s"], r["user_s"], r["sys_s"], r["minor_faults"]])
                print(f"{recipe} depth {d} {name}: {r}", flush=True)
    per_layer = []
    for recipe in recipes:
        for name in codes:
            runs = results["runs"][recipe][name]
            k = round(slope(depths, [runs[d]["peak_rss_mib"] for d in depths]), 2)
            results["runs"][recipe][name]["growth_mib_per_layer"] = k
            per_layer.append([recipe, name, k, round(runs[depths[0]]["peak_rss_mib"] - k * depths[0], 1)])
    commit = source_revision(ROOT)
    results.update(date=time.strftime("%Y-%m-%d", time.gmtime()), commit=commit,
                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
    lm = results["layer_mib"]
    md = [f"# Peak host RSS of `sq-export --target trtllm --tp {args.tp}` against depth", "",
          f"Recorded {results['date']} with the code of `{commit}` ({results['machine']}); command: `{command}`", "",
          f"Each run: `{export_args}` in a fresh process, from a random float16 Llama of hidden {hf['hidden_size']}, "
          f"intermediate {hf['intermediate_size']}, vocabulary {hf['vocab_size']} (one layer: {lm['float16']} MiB in "
          f"float16, {lm['float32']} MiB in float32).", "",
          markdown_table(["recipe", "layers", "code", "peak RSS MiB", "wall s", "user s", "sys s", "minor faults"], rows), "",
          "Per-layer constant (least-squares slope of peak RSS over depth) and the intercept:", "",
          markdown_table(["recipe", "code", "MiB per layer", "MiB at 0 layers"], per_layer), ""]
    (out / "export-rss.md").write_text("\n".join(md))
    (out / "export-rss.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for recipe in recipes:
            for name in codes:
                ax.plot(depths, [results["runs"][recipe][name][d]["peak_rss_mib"] for d in depths], marker="o",
                        label=f"{recipe} ({name})")
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("peak host RSS (MiB)")
        ax.set_title(f"sq-export --target trtllm --tp {args.tp} ({args.device}): peak host RSS")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "export-rss.png", dpi=110)
    except ImportError:
        print("matplotlib is not installed: no PNG")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
