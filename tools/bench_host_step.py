"""The host's share of a served decode step: the scheduler's time per step around a model that costs nothing.

On a GPU a decode step is a CUDA-graph replay of a few milliseconds; between two replays the
engine's thread samples, copies the sampled ids to the host, appends each row's token to its
sequence (incremental detokenization, stop strings, lengths) and launches the next step. That
host work is serial with the GPU's (the ids must reach the host before the next step is
scheduled), so at large batches it sets a floor under the step time. This benchmark runs the
real :class:`~sqdeploy.runtime.slot_batching.SlotScheduler`, sequences and tokenizer over a kernel
backend whose model steps cost nothing and whose sampler returns precomputed ids (tokens of real
code text; on a GPU the logits and their argmax stay on the device), and
reports host milliseconds per step per batch size, side by side for two detokenizer paths in one
run: the tokenizers library's own decode (what sq-serve uses) and ``tokenizer.decode`` through
transformers (the previous path, and what a hand-written server usually calls). Next to them,
the decode step (TPOT) a GPU run measured, from a committed ``gpu_serve_check.py`` report.

    python tools/bench_host_step.py --model ../shared/models/tiny-code-llama --out reports/host-step
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _SlowDecode:
    """The tokenizer seen through ``tokenizer.decode`` only (no ``backend_tokenizer``)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def decode(self, ids, **kw):
        return self._tok.decode(ids, **kw)


def host_ms_per_step(backend, tokenizer, batch: int, text_ids: list[int], steps: int, repeat: int) -> float:
    """Median over ``repeat`` runs of the scheduler's wall milliseconds per decode step at ``batch`` rows."""
    import torch

    from sqdeploy.runtime import BatchConfig, SamplingParams
    from sqdeploy.runtime.engine import GenerationRequest
    from sqdeploy.runtime.sequence import Sequence
    from sqdeploy.runtime.slot_batching import SlotScheduler

    # the tokens of each step: a real text's ids, different per row; logits and their argmax live on the GPU
    # in the served path (only the sampled ids cross to the host), so sampling is replaced by a table lookup
    tables = [torch.tensor([text_ids[(k * batch + 7 * r) % len(text_ids)] for r in range(batch)]) for k in range(64)]
    calls = {"n": 0}
    dummy = torch.zeros(batch, 1)

    def sample(logits, params, request_ids, seqs):
        calls["n"] += 1
        return tables[calls["n"] % len(tables)][: logits.shape[0]]

    backend.prefill = lambda slot, ids, start: dummy[0]
    backend.prefill_rows = lambda slots, ids, start: dummy[: len(slots)]
    backend.decode = lambda slots: dummy[: len(slots)]
    backend.sampler.sample_tensor = sample
    params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    runs = []
    for _ in range(repeat):
        sched = SlotScheduler(backend, BatchConfig(batch, 1 << 20))
        for r in range(batch):
            sched.waiting.append(Sequence(GenerationRequest([5 + r, 6, 7, 8], params), None, tokenizer, backend.info.eos_ids))
        sched.step()  # admission, prefill, first decode
        t0 = time.perf_counter()
        n = 0
        while sched.has_work():
            sched.step()
            n += 1
        runs.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(runs)


def gpu_tpot(report: Path | None) -> dict[int, float]:
    if report is None or not report.exists():
        return {}
    rows = json.loads(report.read_text()).get("bench_7b", {}).get("rows", [])
    return {r["batch"]: r["tpot_s"] * 1e3 for r in rows if r.get("variant") == "fp16" and "tpot_s" in r}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "tiny-code-llama"),
                    help="an HF model directory: its tokenizer and config (its weights are never run)")
    ap.add_argument("--out", required=True, help="folder for host-step.json, host-step.md and host-step.png")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=128, help="decode steps per run (default 128)")
    ap.add_argument("--repeat", type=int, default=9, help="alternating runs of each path per batch size; medians (default 9)")
    ap.add_argument("--gpu-report", default=str(ROOT / "docs" / "benchmarks" / "gpu-serve-check-h100-warm.json"),
                    help="a gpu_serve_check.py JSON whose FP16 TPOT is printed beside (default: the committed H100 run)")
    args = ap.parse_args(argv)
    import torch

    from sqdeploy.core.report import cpu_model, markdown_table, source_revision, write_json_atomic
    from sqdeploy.runtime.backends.kernel import KernelBackend, KernelConfig

    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    backend = KernelBackend(args.model, "cpu", KernelConfig(max_batch_size=max(batches), max_model_len=args.steps + 16,
                                                            cuda_graphs=False), log=lambda m: None)
    tok = backend.tokenizer
    text_ids = tok((ROOT / "sqdeploy" / "runtime" / "sequence.py").read_text()).input_ids
    tpot = gpu_tpot(Path(args.gpu_report) if args.gpu_report else None)
    rows = []
    for b in batches:
        pairs = [(host_ms_per_step(backend, tok, b, text_ids, args.steps, 1),  # alternating: drift hits both
                  host_ms_per_step(backend, _SlowDecode(tok), b, text_ids, args.steps, 1)) for _ in range(args.repeat)]
        fast, slow = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        rows.append({"batch": b, "host_ms": fast, "host_ms_transformers_decode": slow, "gpu_tpot_ms": tpot.get(b)})
        print(f"batch {b}: host {fast:.3f} ms per step (transformers decode: {slow:.3f} ms)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"command": "python tools/bench_host_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__},
            "gpu_report": args.gpu_report, "rows": rows}
    data["commit"] = source_revision(ROOT)
    write_json_atomic(out / "host-step.json", data)
    table = markdown_table(
        ["batch", "host ms per step", "with transformers' decode", "speed-up", "H100 FP16 decode step (TPOT) ms",
         "host share of that step"],
        [[r["batch"], f"{r['host_ms']:.3f}", f"{r['host_ms_transformers_decode']:.3f}",
          f"{r['host_ms_transformers_decode'] / r['host_ms']:.2f}x",
          "" if r["gpu_tpot_ms"] is None else f"{r['gpu_tpot_ms']:.2f}",
          "" if r["gpu_tpot_ms"] is None else f"{r['host_ms'] / r['gpu_tpot_ms']:.0%} (was "
          f"{r['host_ms_transformers_decode'] / r['gpu_tpot_ms']:.0%})"] for r in rows])
    (out / "host-step.md").write_text(
        f"# Host time of a decode step\n\n`{data['command']}`, commit {data.get('commit', '?')[:12]}, "
        f"{data['machine']['cpu']}, one torch thread. The GPU column is a measurement from another machine (its "
        f"report: `{Path(args.gpu_report).name}`); the share is this host's time against it.\n\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r["batch"] for r in rows]
    ax.plot(xs, [r["host_ms"] for r in rows], "o-", label="host, tokenizers' decode (sq-serve)")
    ax.plot(xs, [r["host_ms_transformers_decode"] for r in rows], "s--", label="host, transformers' decode")
    if any(r["gpu_tpot_ms"] for r in rows):
        ax.plot(xs, [r["gpu_tpot_ms"] for r in rows], "k^:", label="H100 FP16 decode step (measured)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per step")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "host-step.png", dpi=110)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
