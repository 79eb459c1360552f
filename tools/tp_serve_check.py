"""Tensor-parallel serving on two GPUs: ``sq-serve CKPT --tp 2`` against tp 1 of the same checkpoint.

    PYTHONPATH=. python tools/tp_serve_check.py --model ../shared/models/tiny-code-llama \\
        --calib ../shared/data/humaneval.jsonl.gz --out OUT

For each recipe it exports TensorRT-LLM checkpoints at tp 1 and tp 2 (``sq-export --target
trtllm``), opens both through ``open_engine(CKPT, tp=N, device="cuda")`` (the server's engine:
slot scheduler, per-rank slot KV caches, NCCL) and reports

* greedy tokens of tp 2 batched vs one prompt at a time vs tp 1, per prompt;
* offline output tokens/s at several batch sizes for tp 1 and tp 2 (``sq-bench offline``'s code);
* a burst of concurrent HTTP requests through the real app (all answered, tokens equal offline);
* served / offline throughput at batch 8 for tp 2 (``sq-bench overhead``'s code; first recipe only);
* that the rank processes are gone after ``shutdown()``, and that ``--tp 2`` with one visible GPU is
  refused with one line (exit 2).

Results: ``tp_serve_check.json`` and ``tp_serve_check.md`` in ``--out``. One call, a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sqdeploy.core.report import source_revision  # noqa: E402


def _export(model: str, recipe: str, tp: int, out: Path, calib: str | None, device: str) -> Path:
    from sqdeploy.cli.export import main as export_main

    dst = out / f"{recipe}-tp{tp}"
    argv = [model, "--recipe", recipe, "--target", "trtllm", "--tp", str(tp), "--out", str(dst), "--force",
            "--device", device, "--calib-samples", "16", "--calib-seq-len", "256"]
    if calib:
        argv += ["--calib", calib]
    rc = export_main(argv)
    if rc:
        raise SystemExit(f"export of {model} ({recipe}) at tp {tp} failed ({rc})")
    return dst


def _prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    src = (Path(__file__).resolve().parents[1] / "sqdeploy" / "runtime" / "batching.py").read_text()
    ids = tokenizer(src, add_special_tokens=False).input_ids
    return [ids[i * 37 : i * 37 + length - (i % 3) * 5] for i in range(n)]  # varied lengths


def _alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _tokens(ckpt: Path, tp: int, prompts: list[list[int]], new: int, device: str) -> dict:
    from sqdeploy.runtime import BatchConfig, KernelOptions, SamplingParams, generate, open_engine
    from sqdeploy.runtime.server.limits import ServeLimits
    from sqdeploy.runtime.server.run import ServerThread

    p = SamplingParams(max_new_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    engine = open_engine(ckpt, tp=tp, device=device, batch=BatchConfig(len(prompts), 2048),
                         kernel=KernelOptions(max_model_len=1024))
    start_s = time.perf_counter() - t0
    pids = engine.backend.ranks.pids()
    out = {"start_s": start_s, "ranks": len(pids)}
    try:
        out["batched"] = [c.token_ids for c in generate(engine, prompts, p)]
        out["single"] = [generate(engine, [q], p)[0].token_ids for q in prompts]
        if tp > 1:
            limits = ServeLimits(max_prompt_tokens=512, max_new_tokens=512, max_concurrent=len(prompts),
                                 max_queue=64, request_timeout_s=120, max_body_bytes=1 << 20)
            import httpx

            with ServerThread(engine, limits) as url:
                def one(q):
                    body = {"model": engine.info.name, "prompt": q, "max_tokens": new, "temperature": 0,
                            "ignore_eos": True, "stream": True}
                    text = []
                    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                        for line in r.iter_lines():
                            if line.startswith("data:") and line != "data: [DONE]":
                                text.append(json.loads(line[5:])["choices"][0]["text"])
                    return "".join(text)

                t1 = time.perf_counter()
                with ThreadPoolExecutor(len(prompts)) as pool:
                    texts = list(pool.map(one, prompts))
                out["http_s"] = time.perf_counter() - t1
                want = [engine.tokenizer.decode(t) for t in out["batched"]]
                out["http_equal"] = sum(a == b for a, b in zip(texts, want))
                out["http_n"] = len(prompts)
    finally:
        engine.shutdown()
    time.sleep(1.0)
    out["ranks_left"] = len(_alive(pids))
    return out


def _throughput(ckpt: Path, tp: int, batches: tuple[int, ...], in_len: int, out_len: int, device: str) -> list[dict]:
    from sqdeploy.runtime.bench.offline import EngineSpec, OfflineGrid, run_variant

    r = run_variant(EngineSpec(str(ckpt), "auto", device, tp=tp), OfflineGrid(batches, (in_len,), (out_len,), 2, 1))
    return [{"batch": row["batch_size"], "tokens_per_s": row["tokens_per_s"], "ttft_s": row["ttft_s"],
             "tpot_s": row["tpot_s"]} for row in r["rows"]]


def _overhead(ckpt: Path, device: str) -> dict:
    from sqdeploy.runtime.bench.overhead import OverheadConfig, measure_overhead

    cfg = OverheadConfig(batch=8, input_len=128, output_len=64, rounds=2, requests_per_round=16, device=device, tp=2)
    r = measure_overhead(str(ckpt), "auto", cfg, progress=False)
    return {k: r[k] for k in ("offline_tokens_per_s", "served_tokens_per_s") if k in r}


def _refusal(ckpt: Path) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    p = subprocess.run([sys.executable, "-m", "sqdeploy.cli.serve", str(ckpt), "--tp", "2", "--device", "cuda"],
                       capture_output=True, text=True, env=env, timeout=120)
    lines = p.stderr.strip().splitlines()
    return {"exit": p.returncode, "stderr_lines": len(lines), "message": lines[-1] if lines else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipes", default="fp16,w8a8-sq-o3,w4a16-rtn")
    ap.add_argument("--calib", default=None)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--in-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--skip-overhead", action="store_true", help="no served / offline comparison")
    ap.add_argument("--device", default="cuda", help="cuda (NCCL, the check) or cpu (gloo, a dry run of this script)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "ckpt"
    res = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "torch": torch.__version__,
           "commit": source_revision(),
           "recipes": {}}
    from sqdeploy.runtime.backends.base import load_tokenizer

    batches = tuple(int(b) for b in args.batches.split(","))
    for recipe in args.recipes.split(","):
        r: dict = {}
        try:
            ck = {tp: _export(args.model, recipe, tp, work, args.calib, args.device) for tp in (1, 2)}
            prompts = _prompts(load_tokenizer(ck[2]), args.prompts, args.prompt_len)
            t = {tp: _tokens(ck[tp], tp, prompts, args.new_tokens, args.device) for tp in (1, 2)}
            r["tp2_batched_eq_single"] = sum(a == b for a, b in zip(t[2]["batched"], t[2]["single"]))
            r["tp2_eq_tp1"] = sum(a == b for a, b in zip(t[2]["batched"], t[1]["batched"]))
            r["tp1_batched_eq_single"] = sum(a == b for a, b in zip(t[1]["batched"], t[1]["single"]))
            r["first_diff"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                               for a, b in zip(t[2]["batched"], t[1]["batched"])]
            r["n"] = len(prompts)
            r["tokens"] = {tp: {k: v for k, v in t[tp].items() if k not in ("batched", "single")} for tp in (1, 2)}
            r["throughput"] = {tp: _throughput(ck[tp], tp, batches, args.in_len, args.out_len, args.device) for tp in (1, 2)}
            if not args.skip_overhead and "overhead" not in res:
                res["overhead"] = {"recipe": recipe, **_overhead(ck[2], args.device)}
            if "refusal" not in res and args.device == "cuda":
                res["refusal"] = _refusal(ck[2])
        except Exception as exc:  # noqa: BLE001 - one recipe's failure is reported, the others still run
            import traceback

            r["error"] = f"{type(exc).__name__}: {exc}"
            r["traceback"] = traceback.format_exc()
        res["recipes"][recipe] = r
        (out / "tp_serve_check.json").write_text(json.dumps(res, indent=2, default=str))
    md = [f"# tp serving check ({', '.join(res['gpus'])}; torch {res['torch']}; commit {res['commit']})", "",
          "| recipe | tp2 batched = single | tp2 = tp1 | tp1 batched = single | HTTP burst equal | ranks left | start s (tp1/tp2) |",
          "|---|---|---|---|---|---|---|"]
    for name, r in res["recipes"].items():
        if "error" in r:
            md.append(f"| {name} | error: {r['error']} | | | | | |")
            continue
        t2, t1 = r["tokens"][2], r["tokens"][1]
        md.append(f"| {name} | {r['tp2_batched_eq_single']}/{r['n']} | {r['tp2_eq_tp1']}/{r['n']} | "
                  f"{r['tp1_batched_eq_single']}/{r['n']} | {t2.get('http_equal')}/{t2.get('http_n')} | "
                  f"{t1['ranks_left']}/{t2['ranks_left']} | {t1['start_s']:.1f}/{t2['start_s']:.1f} |")
    md += ["", f"Offline output tokens/s (input {args.in_len}, output {args.out_len}):", "",
           "| recipe | batch | tp 1 | tp 2 | tp2 / tp1 |", "|---|---|---|---|---|"]
    for name, r in res["recipes"].items():
        for a, b in zip(r.get("throughput", {}).get(1, []), r.get("throughput", {}).get(2, [])):
            md.append(f"| {name} | {a['batch']} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
                      f"{b['tokens_per_s'] / a['tokens_per_s']:.2f} |")
    if "overhead" in res:
        o = res["overhead"]
        off, on = o["offline_tokens_per_s"], o["served_tokens_per_s"]
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        md += ["", f"tp 2 {o['recipe']}, batch 8, input 128, output 64: offline {med(off):.0f} tokens/s, served "
                   f"{med(on):.0f} tokens/s ({med(on) / med(off):.0%}); rounds offline {off}, served {on}"]
    if "refusal" in res:
        f = res["refusal"]
        md += ["", f"`--tp 2` with one visible GPU: exit {f['exit']}, {f['stderr_lines']} line(s): `{f['message']}`"]
    (out / "tp_serve_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
