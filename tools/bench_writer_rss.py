"""Peak host memory of ``sq-export --target trtllm`` against model depth, for two versions of the code.

Random Llama models of one width and several depths (shards hard-linked from the deepest,
:mod:`sqdeploy.testing.random_checkpoint`) are quantized once (``--target quantized``); then each
code version (``--code NAME=REPO_ROOT``, imported through PYTHONPATH) exports every quantized
model to a TensorRT-LLM checkpoint in a fresh process, whose peak resident set is recorded:
``VmHWM`` read by the child itself at exit (``ru_maxrss`` would not do: a child's starts at its
parent's high-water mark, which fork and exec carry over). A writer that holds every rank's tensors until the end grows by
about one quantized layer per layer; one that streams the rank files stays flat. Writes
``export-writer-rss.{json,md,png}`` into ``--out``.

    python tools/bench_writer_rss.py --out docs/benchmarks --code before=../main --code after=.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# sq-export with its own peak RSS (VmHWM of the process after exec) written to $BENCH_HWM_FILE at exit
LAUNCH = (
    "import atexit, os, runpy\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            open(os.environ['BENCH_HWM_FILE'], 'w').write(line.split()[1])\n"
    "atexit.register(_hwm)\n"
    "runpy.run_module('sqdeploy.cli.export', run_name='__main__', alter_sys=True)\n"
)
WIDTH = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 8,
         "vocab_size": 4096}


def run(cmd: list[str], code: Path, log: Path) -> dict:
    hwm = log.with_suffix(".hwm")
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1", "BENCH_HWM_FILE": str(hwm)}
    cmd = [cmd[0], "-c", LAUNCH, *cmd[3:]]  # cmd is [python, -m, sqdeploy.cli.export, ...]
    t0 = time.perf_counter()
    with log.open("w") as f:
        # cwd: python puts it first on sys.path, so the child would import the code it is started from
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(code))
        _, status, ru = os.wait4(proc.pid, 0)
    code_ = os.waitstatus_to_exitcode(status)
    if code_ != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code_}); see {log}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mib": round(int(hwm.read_text()) / 1024, 1),
            "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--code", action="append", required=True, help="NAME=REPO_ROOT (the code to measure), repeatable")
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--recipe", default="w8a8-sq-o1")
    ap.add_argument("--work", default=None, help="working folder (kept; quantized models already there are reused)")
    args = ap.parse_args()
    from sqdeploy.core.report import markdown_table, source_revision
    from sqdeploy.testing.random_checkpoint import SMALL, random_prompts, with_layers, write_random_llama

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    depths = [int(d) for d in args.depths.split(",")]
    codes = dict(c.split("=", 1) for c in args.code)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="writer-rss-"))
    hf = {**SMALL, **WIDTH}
    base = work / "base"
    if not (base / "config.json").exists():
        write_random_llama(base, hf, max(depths), device="cpu")
    calib = work / "calib.jsonl"
    if not calib.exists():
        random_prompts(calib, hf["vocab_size"], texts=8, words=200)
    rows, results = [], {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "shape": hf, "tp": args.tp,
                         "recipe": args.recipe, "depths": depths, "quantize": {}, "write": {n: {} for n in codes}}
    py = sys.executable
    for d in depths:
        model = with_layers(base, work / f"L{d}", d)
        qdir = work / f"q{d}"
        first = next(iter(codes.values()))
        if not (qdir / "config.json").exists():
            results["quantize"][d] = run([py, "-m", "sqdeploy.cli.export", str(model), "--recipe", args.recipe, "--out", str(qdir),
                                          "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "128", "--quiet"],
                                         Path(first).resolve(), work / f"q{d}.log")
        for name, code in codes.items():
            r = run([py, "-m", "sqdeploy.cli.export", str(qdir), "--target", "trtllm", "--tp", str(args.tp), "--out",
                     str(work / f"t{d}-{name}"), "--quiet", "--force"], Path(code).resolve(), work / f"t{d}-{name}.log")
            r["rank_files_mib"] = round(sum(f.stat().st_size for f in (work / f"t{d}-{name}").glob("rank*.safetensors")) / 2**20, 1)
            results["write"][name][d] = r
            rows.append([d, name, r["peak_rss_mib"], r["rank_files_mib"], r["wall_s"]])
            print(f"depth {d} {name}: {r}", flush=True)
    for name in codes:
        w = results["write"][name]
        results["write"][name]["growth_mib_per_layer"] = round(
            (w[depths[-1]]["peak_rss_mib"] - w[depths[0]]["peak_rss_mib"]) / (depths[-1] - depths[0]), 2)
    commit = source_revision(ROOT)
    results["date"], results["commit"] = time.strftime("%Y-%m-%d", time.gmtime()), commit
    results["cpu"] = f"{os.cpu_count()} CPUs"
    md = [f"# Peak host RSS of the TensorRT-LLM writer against depth (tp {args.tp}, `{args.recipe}`)", "",
          f"Recorded {results['date']} with the code of `{commit}` as `after` (CPU, {os.cpu_count()} cores); "
          f"command: `{results['command']}`", "",
          f"Random Llama, hidden {hf['hidden_size']}, intermediate {hf['intermediate_size']}, vocabulary {hf['vocab_size']}; "
          "each row is `sq-export QDIR --target trtllm` from the same quantized model, in a fresh process.", "",
          markdown_table(["layers", "code", "peak RSS MiB", "rank files MiB", "wall s"], rows), "",
          "Growth per layer: " + ", ".join(f"{n} {results['write'][n]['growth_mib_per_layer']} MiB" for n in codes), ""]
    (out / "export-writer-rss.md").write_text("\n".join(md))
    (out / "export-writer-rss.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in codes:
            ax.plot(depths, [results["write"][name][d]["peak_rss_mib"] for d in depths], marker="o", label=name)
        ax.plot(depths, [results["write"][next(iter(codes))][d]["rank_files_mib"] for d in depths], ls="--", c="grey",
                label="rank files written")
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("MiB")
        ax.set_title(f"sq-export --target trtllm --tp {args.tp}: peak host RSS")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "export-writer-rss.png", dpi=110)
    except ImportError:
        print("matplotlib is not installed: no PNG")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
