"""Prefill and decode speed of ONNX decoder graphs in ONNX Runtime on CPU, side by side in one run.

Works on any graph with the Optimum / ONNX Runtime GenAI signature (``input_ids``,
``attention_mask``, optional ``position_ids``, ``past_key_values.{i}.key|value`` ->
``logits``, ``present.{i}.key|value``): sq-deploy exports, ``optimum-cli export onnx``
and ``onnxruntime_genai.models.builder`` outputs. The decode loop keeps the KV cache
in ONNX Runtime's OrtValues between steps (IO binding: no copy through numpy); graphs
with GroupQueryAttention update one preallocated buffer per layer in place (``--kv-copy``
turns that off), after checking once per graph that this decodes the same tokens as the
copying loop.
Ratios are to the graph named by ``--baseline``, measured in the same run.

    python tools/bench_onnx_cpu.py --graph fp32=EXPORT_DIR --graph int4=EXPORT_DIR ... \\
        --baseline fp32 --threads 2 --prefill 512 --prompt 256 --decode 128 --batches 1 8 \\
        --ppl-text ../shared/data/heldout-code-llama.txt.gz --tokenizer ../shared/models/tiny-code-llama \\
        --genai-runtime genai-int4=GENAI_DIR --genai-python /work/venvs/genai/bin/python --md out.md --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Graph:
    """One decoder graph in one ONNX Runtime session."""

    def __init__(self, path: Path, threads: int, share: bool = True):
        self.path = path
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        meta = path / "sqdeploy-onnx.json"
        level = json.loads(meta.read_text()).get("accuracy_level") if meta.exists() else None
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(max(1, level or 0)))
        self.session = ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.session.get_inputs()}
        self.kv = [n for n in ins if n.startswith("past_key_values.")]
        first = ins[self.kv[0]]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        if not isinstance(self.head_dim, int):  # GenAI writes a symbolic head size; its config has the number
            self.head_dim = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        self.kv_dtype = FLOAT_TYPES[first.type]
        self.has_positions = "position_ids" in ins
        self.outputs = [o.name for o in self.session.get_outputs()]
        # GroupQueryAttention graphs can update the cache in place (sq-deploy's onnxruntime variant, GenAI)
        self.shared_buffer = share and any(n.op_type == "GroupQueryAttention" for n in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node)

    def _feeds(self, ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
        b, t = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, past_len + t), np.int64)}
        if self.has_positions:
            feeds["position_ids"] = np.tile(np.arange(past_len, past_len + t, dtype=np.int64), (b, 1))
        return feeds

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits of a whole sequence (empty cache)."""
        feeds = self._feeds(ids, 0)
        empty = np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), self.kv_dtype)
        feeds.update({n: empty for n in self.kv})
        return self.session.run(["logits"], feeds)[0]

    def generate(self, prompt: np.ndarray, steps: int, capacity: int = 0) -> tuple[float, float, list]:
        """Greedy decoding with the cache kept in OrtValues; returns (prefill s, decode s, tokens).

        ``capacity`` > 0 binds each past and present to one preallocated buffer of that length
        (GroupQueryAttention's shared-buffer mode: no KV copy per step).
        """
        io = self.session.io_binding()
        b, t = prompt.shape
        cap = capacity if capacity else 0
        past = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((b, self.kv_heads, cap, self.head_dim), self.kv_dtype)) for n in self.kv}
        ids, length, t0, prefill, tokens = prompt, 0, time.perf_counter(), 0.0, []
        for step in range(steps + 1):
            for name, value in self._feeds(ids, length).items():
                io.bind_cpu_input(name, value)
            for name, value in past.items():
                io.bind_ortvalue_input(name, value)
            io.bind_output("logits", "cpu")
            for k, name in enumerate(self.outputs[1:]):
                if cap:
                    io.bind_ortvalue_output(name, past[self.kv[k]])
                else:
                    io.bind_output(name, "cpu")
            self.session.run_with_iobinding(io)
            outs = io.get_outputs()
            length += ids.shape[1]
            ids = outs[0].numpy()[:, -1].argmax(-1)[:, None]
            tokens.append(ids[:, 0].tolist())
            if not cap:
                past = {n: outs[1 + k] for k, n in enumerate(self.kv)}
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            if step == 0:
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
        return prefill, time.perf_counter() - t0, tokens


def perplexity(graph: Graph, windows: np.ndarray) -> float:
    total, count = 0.0, 0
    for w in windows:
        logits = graph.forward(w[None]).astype(np.float32)[0, :-1]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return math.exp(total / count)


def check_shared_buffer(graph: Graph, prompts: np.ndarray, cap: int, steps: int = 8) -> None:
    """The in-place cache must decode exactly what the copying loop decodes (else its speed means nothing)."""
    shared, copied = graph.generate(prompts, steps, cap)[2], graph.generate(prompts, steps, 0)[2]
    if shared != copied:
        raise SystemExit(f"{graph.path}: the shared-buffer KV cache decodes {shared} but the copying loop {copied}")


def measure(graph: Graph, tokens: np.ndarray, args, warm: bool) -> dict:
    """One measurement of every figure (best of ``--repeats``); ``warm`` skips the warm-up runs."""
    row = {}
    prompt = tokens[: args.prefill][None]
    if not warm:
        graph.forward(prompt)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        graph.forward(prompt)
        times.append(time.perf_counter() - t0)
    row["prefill_tok_s"] = args.prefill / min(times)
    for b in args.batches:
        prompts = np.stack([tokens[k * args.prompt: (k + 1) * args.prompt] for k in range(b)])
        cap = args.prompt + args.decode + 1 if graph.shared_buffer else 0
        if not warm:
            if cap and b == args.batches[0]:
                check_shared_buffer(graph, prompts, cap, min(8, args.decode))
            graph.generate(prompts, 4, cap)
        best = min(graph.generate(prompts, args.decode, cap)[1] for _ in range(args.repeats))
        row[f"decode_b{b}_tok_s"] = b * args.decode / best
    return row


def measure_all(specs: list[str], tokens: np.ndarray, windows, args) -> dict:
    """Round-robin over the graphs (``--rounds``), keeping each figure's best: load that changes during
    the run then hits every graph alike. ``--rounds 1`` loads one graph at a time (large models)."""
    rows: dict[str, dict] = {}
    graphs = {}
    for r in range(args.rounds):
        for spec in specs:
            name, path = spec.split("=", 1)
            graph = graphs.get(name) or Graph(Path(path), args.threads, share=not args.kv_copy)
            row = measure(graph, tokens, args, warm=r > 0)
            old = rows.setdefault(name, {"path": path})
            for k, v in row.items():
                old[k] = max(old.get(k, 0.0), v)
            if windows is not None and "perplexity" not in old:
                old["perplexity"] = perplexity(graph, windows)
            print(name, json.dumps(old), file=sys.stderr, flush=True)
            if args.rounds > 1:
                graphs[name] = graph
            del graph
    return rows


def genai_runtime(name: str, path: str, args, prompt: list[int]) -> dict:
    """Decode speed with ONNX Runtime GenAI's own runtime (run in its virtual environment)."""
    helper = Path(__file__).with_name("bench_genai_runtime.py")
    cmd = [args.genai_python, str(helper), path, "--threads", str(args.threads), "--decode", str(args.decode),
           "--prompt-ids", ",".join(map(str, prompt))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def tokens_for(args) -> tuple[np.ndarray, np.ndarray | None]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    import gzip

    opener = gzip.open if args.ppl_text.endswith(".gz") else open
    with opener(args.ppl_text, "rt", encoding="utf-8") as f:
        ids = np.asarray(tok(f.read(), add_special_tokens=False).input_ids, dtype=np.int64)
    need = max(args.prefill, args.prompt * max(args.batches))
    windows = None
    if args.ppl_windows:
        step = max(512, (len(ids) - 512) // args.ppl_windows)
        windows = np.stack([ids[i * step: i * step + 512] for i in range(args.ppl_windows)])
    return ids[:need], windows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", default=[], metavar="NAME=DIR", help="a graph directory (repeatable)")
    ap.add_argument("--genai-runtime", action="append", default=[], metavar="NAME=DIR", help="a GenAI model run by its own runtime")
    ap.add_argument("--genai-python", default="/work/venvs/genai/bin/python")
    ap.add_argument("--baseline", required=True, help="NAME of the graph the ratios are taken to")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement (batch 1)")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens before decoding")
    ap.add_argument("--decode", type=int, default=128, help="greedy tokens decoded per measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2, help="measurements per round (best kept)")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin passes over all graphs (1: one graph loaded at a time)")
    ap.add_argument("--ppl-text", required=True, help="held-out text: prompts and perplexity windows")
    ap.add_argument("--ppl-windows", type=int, default=0, help="also perplexity on N windows of 512 (24 = the sq-eval standard)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--kv-copy", action="store_true",
                    help="GroupQueryAttention graphs too: a new present tensor per step instead of the in-place cache")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    tokens, windows = tokens_for(args)
    rows = measure_all(args.graph, tokens, windows, args)
    for spec in args.genai_runtime:
        name, path = spec.split("=", 1)
        rows[name] = {"path": path, **genai_runtime(name, path, args, tokens[: args.prompt].tolist())}
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    table = report(rows, args)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_before": os.getloadavg(), "rows": rows}, indent=2))
    return 0


def report(rows: dict, args) -> str:
    base = rows[args.baseline]
    keys = ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in args.batches]
    heads = [f"prefill {args.prefill} tok/s"] + [f"decode b{b} tok/s" for b in args.batches]
    lines = ["| graph | " + " | ".join(heads) + " | perplexity |", "|---" * (len(heads) + 2) + "|"]
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("" if v is None else f"{v:.0f} ({v / base[k]:.2f}x)" if base.get(k) else f"{v:.0f}")
        ppl = r.get("perplexity")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if ppl is None else f'{ppl:.4f}'} |")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join(lines) + f"\n\n{args.threads} threads; decode after a {args.prompt}-token prompt, {args.decode} greedy tokens; load average after the run: {load}"


if __name__ == "__main__":
    raise SystemExit(main())
