"""Served against offline throughput on a CPU, with model steps that take as long as a GPU's: what HTTP costs.

The served path's overhead (HTTP, server-sent events, the event loop sharing the interpreter with the
engine's thread) does not need a GPU to measure; what it needs is model steps of a GPU's duration. This
script runs the real engine, scheduler, sequences, tokenizer and ``sq-serve`` app around a kernel
backend whose prefill and decode only wait (``--decode-ms`` per step, ``--prefill-ms`` per 16,384
prompt tokens: by default the H100 figures of ``docs/benchmarks/gpu-serve-check-h100-warm.md``,
FP16 at batch 32) and whose sampler returns ids of real code text. It measures offline tokens/s at
batch 32 (one batch of 32 prompts, median of 3) and then the served closed loop of 32 streaming
clients (``sq-bench online`` in another process) in ``--rounds`` rounds, and writes the ratio.

    python tools/serve_proxy.py --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for serve-proxy.json and serve-proxy.md")
    ap.add_argument("--decode-ms", type=float, default=1.7, help="wait per decode step (default 1.7: an H100's FP16 "
                    "step at 32 rows, 1.87 ms measured, less this host's share)")
    ap.add_argument("--prefill-ms", type=float, default=54.0, help="wait per 16,384 prompt tokens (default 54)")
    ap.add_argument("--requests", type=int, default=192, help="served requests per round (default 192)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from sqdeploy.core.report import cpu_model, markdown_table, source_revision, write_json_atomic
    from sqdeploy.runtime import BatchConfig, SamplingParams, generate
    from sqdeploy.runtime.backends.kernel import KernelBackend, KernelConfig
    from sqdeploy.runtime.batching import BatchingEngine
    from sqdeploy.runtime.server.limits import ServeLimits
    from sqdeploy.runtime.server.run import ServerThread
    from sqdeploy.testing.random_model import TINY_CONFIGS, make_random_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="serve-proxy-"))
    cfg = dict(TINY_CONFIGS["llama"], max_position_embeddings=1024)
    shared = ROOT.parent / "shared" / "models" / "tiny-code-llama"
    model = make_random_model(cfg, work / "model", tokenizer_from=shared if shared.exists() else None)
    be = KernelBackend(model, "cpu", KernelConfig(max_batch_size=32, max_prefill_tokens=4096, max_model_len=640,
                                                  cuda_graphs=False), log=lambda m: None)
    vocab = be.info.vocab_size
    ids = [t % vocab for t in be.tokenizer((ROOT / "sqdeploy" / "runtime" / "sequence.py").read_text()).input_ids]
    tables = [torch.tensor([ids[(k * 32 + 7 * r) % len(ids)] for r in range(32)]) for k in range(64)]
    calls = {"n": 0}
    dummy = torch.zeros(32, 1)
    per_token = args.prefill_ms / 1e3 / 16384

    def sample(logits, params, request_ids, seqs):
        calls["n"] += 1
        return tables[calls["n"] % len(tables)][: logits.shape[0]]

    def prefill(slot, prompt, start):
        time.sleep(len(prompt) * per_token)
        return dummy[0]

    def prefill_rows(slots, prompts, start):
        time.sleep(sum(len(p) for p in prompts) * per_token)
        return dummy[: len(slots)]

    def decode(slots):
        time.sleep(args.decode_ms / 1e3)
        return dummy[: len(slots)]

    be.prefill, be.prefill_rows, be.decode, be.sampler.sample_tensor = prefill, prefill_rows, decode, sample
    engine = BatchingEngine(be, BatchConfig(32, 4096))
    params = SamplingParams(max_new_tokens=128, ignore_eos=True)
    prompts = [[5 + (i * 7 + j) % 1000 for j in range(512)] for i in range(32)]
    generate(engine, prompts[:4], params)
    offline = []
    for _ in range(3):
        t0 = time.perf_counter()
        done = generate(engine, prompts, params)
        offline.append(sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0))
    off = statistics.median(offline)
    served = []
    with ServerThread(engine, ServeLimits(max_concurrent=32, max_queue=64)) as url:
        for r in range(args.rounds):
            out = work / f"online{r}"
            subprocess.run([sys.executable, "-m", "sqdeploy.cli.bench", "online", url, "--concurrency", "32",
                            "--num-requests", str(args.requests), "--input-len", "512", "--output-len", "128",
                            "--out", str(out), "--force", "--quiet"], check=True, capture_output=True)
            pt = json.loads((out / "report.json").read_text())["points"][0]
            served.append({"tok_s": pt["output_throughput"], "ttft_p50_ms": pt["ttft_s"]["p50"] * 1e3,
                           "itl_p50_ms": pt["itl_s"]["p50"] * 1e3, "itl_mean_ms": pt["itl_s"]["mean"] * 1e3})
    engine.shutdown()
    data = {"command": "python tools/serve_proxy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpu": cpu_model(), "decode_ms": args.decode_ms, "prefill_ms": args.prefill_ms, "offline_tok_s": offline,
            "served": served, "ratio_median": statistics.median(s["tok_s"] for s in served) / off}
    data["commit"] = source_revision(ROOT)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(outdir / "serve-proxy.json", data)
    table = markdown_table(["round", "served tok/s", "served / offline", "TTFT p50 ms", "ITL p50 ms", "ITL mean ms"],
                           [[i, round(s["tok_s"]), f"{s['tok_s'] / off:.2f}", round(s["ttft_p50_ms"], 1),
                             round(s["itl_p50_ms"], 2), round(s["itl_mean_ms"], 2)] for i, s in enumerate(served)])
    (outdir / "serve-proxy.md").write_text(
        f"# Served against offline with GPU-length model steps, on a CPU\n\n`{data['command']}`, commit "
        f"{data.get('commit', '?')[:12]}, {data['cpu']}; decode steps wait {args.decode_ms} ms, prefill "
        f"{args.prefill_ms} ms per 16,384 tokens. Offline at batch 32: {round(off)} tok/s (median of "
        f"{[round(o) for o in offline]}); the step alone would give {32 / (args.decode_ms / 1e3):.0f}.\n\n{table}\n")
    print(table)
    print(f"offline {off:.0f} tok/s; served / offline (median) {data['ratio_median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
