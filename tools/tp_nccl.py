"""Tensor parallelism over NCCL on two GPUs: tp 2 against tp 1 of the same quantized model.

    # here (CPU): quantized models and the token ids the check feeds them
    python tools/tp_nccl.py prepare --model ../shared/models/tiny-code-llama \\
        --text ../shared/data/heldout-code-llama.txt.gz --prompts ../shared/data/humaneval.jsonl.gz --out .carry/tpdata.json
    # on the two-GPU machine: export tp 1 and tp 2 of each quantized directory, then compare
    PYTHONPATH=. python tools/tp_nccl.py run --quantized .carry/q/w8a8-pt .carry/q/w4-g64 \\
        --data .carry/tpdata.json --out OUT

For each model it writes TensorRT-LLM checkpoints at tp 1 and tp 2 (``sq-export --target
trtllm``), runs each with :class:`~sqdeploy.runtime.tp.TPEngine` over NCCL (one process
per GPU, NVLink multicast off) and reports: the relative difference of the float32 logits
on the evaluation windows, their perplexities, top-1 agreement, greedy continuations of
the HumanEval prompts (eager and from CUDA graphs) token by token, and the float32
checkpoint reader's perplexity as the reference. It also checks that tp 2 is refused with
one GPU visible. Results: ``tp_nccl.json`` and ``tp_nccl.md`` in ``--out``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def prepare(args) -> None:
    from transformers import AutoTokenizer

    from sqdeploy.evaluate.perplexity import eval_windows, read_text
    from sqdeploy.quantize.calibration import load_texts

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = eval_windows(tok, read_text(args.text), args.windows, args.seq_len)
    prompts = [tok(t, add_special_tokens=False).input_ids[: args.prompt_len] for t in load_texts(args.prompts)]
    prompts = [p for p in prompts if len(p) == args.prompt_len][: args.prompts_n]
    Path(args.out).write_text(json.dumps({"windows": windows.tolist(), "prompts": prompts}))
    print(f"wrote {args.out}: {len(windows)} windows of {args.seq_len}, {len(prompts)} prompts of {args.prompt_len}")


def _export(qdir: str, tp: int, out: Path) -> Path:
    from sqdeploy.cli.export import main as export_main

    dst = out / f"{Path(qdir).name}-tp{tp}"
    rc = export_main([qdir, "--target", "trtllm", "--tp", str(tp), "--out", str(dst), "--force", "--quiet"])
    if rc:
        raise SystemExit(f"export of {qdir} at tp {tp} failed ({rc})")
    return dst


def _nll(logits: torch.Tensor, windows: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return float(-logp.gather(2, windows[:, 1:, None]).mean())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _engine_run(path: Path, windows: torch.Tensor, prompts: list[list[int]], new: int, device: str) -> dict:
    from sqdeploy.runtime.tp import TPEngine

    t0 = time.time()
    with TPEngine(str(path), device=device) as eng:
        start = time.time() - t0
        logits = torch.cat([eng.logits(windows[i : i + 4]) for i in range(0, len(windows), 4)])
        eager = eng.generate(prompts, new)
        graph = eng.generate(prompts, new, use_graph=device == "cuda")
    return {"logits": logits, "eager": eager, "graph": graph, "start_s": start}


def _reference_nll(path: Path, windows: torch.Tensor, device: str) -> float:
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
    from sqdeploy.model.loading import load_model

    model = load_model(TrtllmCheckpoint(path), torch.float32, device)
    with torch.no_grad():
        logits = torch.cat([model(windows[i : i + 4].to(device)).float().cpu() for i in range(0, len(windows), 4)])
    del model
    return _nll(logits, windows)


def compare(name: str, tp1: Path, tp2: Path, data: dict, new: int, device: str = "cuda") -> dict:
    from sqdeploy.kernels import matching_lead

    windows = torch.tensor(data["windows"])
    prompts = data["prompts"]
    r1 = _engine_run(tp1, windows, prompts, new, device)
    r2 = _engine_run(tp2, windows, prompts, new, device)
    l1, l2 = r1["logits"], r2["logits"]
    top1 = float((l1.argmax(-1) == l2.argmax(-1)).double().mean())
    nll1, nll2 = _nll(l1, windows), _nll(l2, windows)
    row = {
        "model": name,
        "windows": f"{windows.shape[0]}x{windows.shape[1]}",
        "ppl_tp1": math.exp(nll1), "ppl_tp2": math.exp(nll2),
        "ppl_rel_diff": abs(math.exp(nll2) / math.exp(nll1) - 1),
        "ppl_reference_fp32": math.exp(_reference_nll(tp1, windows, device)),
        "logits_rel_diff": _rel(l2, l1),
        "logits_max_abs_diff": float((l2 - l1).abs().max()),
        "top1_agreement": top1,
        "prompts": len(prompts),
        "greedy_tokens": new,
    }
    for mode in ("eager", "graph"):
        pairs = list(zip(r1[mode], r2[mode]))
        row[f"greedy_{mode}_identical"] = sum(a == b for a, b in pairs)
        row[f"greedy_{mode}_first_diff"] = [(matching_lead(a, b) if a != b else None) for a, b in pairs]
    row["graph_equals_eager_tp1"] = r1["graph"] == r1["eager"]
    row["start_s"] = {"tp1": r1["start_s"], "tp2": r2["start_s"]}
    return row


def refusal(tp2: Path) -> str:
    """tp 2 with one GPU visible must be refused with a clear message (a subprocess: visibility is per process)."""
    code = ("import sys; from sqdeploy.runtime.tp import TPEngine; from sqdeploy.core.errors import SqDeployError\n"
            f"try:\n    TPEngine({str(tp2)!r}, device='cuda').close(); print('STARTED')\n"
            "except SqDeployError as e:\n    print('REFUSED:', e)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return (out.stdout.strip() or out.stderr.strip()[-500:])


def markdown(res: dict) -> str:
    from sqdeploy.core.report import markdown_table

    head = ["model", "ppl tp1", "ppl tp2", "rel. diff", "fp32 reader", "logits rel. diff", "max abs diff", "top-1 agree",
            "greedy eager equal", "greedy graph equal"]
    rows = [[r["model"], f"{r['ppl_tp1']:.4f}", f"{r['ppl_tp2']:.4f}", f"{r['ppl_rel_diff']:.1e}",
             f"{r['ppl_reference_fp32']:.4f}", f"{r['logits_rel_diff']:.1e}", f"{r['logits_max_abs_diff']:.3f}",
             f"{100 * r['top1_agreement']:.2f}%", f"{r['greedy_eager_identical']}/{r['prompts']}",
             f"{r['greedy_graph_identical']}/{r['prompts']}"] for r in res["models"]]
    gpus = ", ".join(res["gpus"])
    return (f"# Tensor parallelism over NCCL: tp 2 vs tp 1\n\nGPUs: {gpus}; PyTorch {res['torch']}, NCCL {res['nccl']}.\n\n"
            + markdown_table(head, rows) + f"\n\ntp 2 with one GPU visible: {res['refusal']}\n")


def run(args) -> int:
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"tp_nccl: needs 2 GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(Path(args.data).read_text())
    work = Path(args.work)
    cuda = args.device == "cuda"
    res = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu (gloo)"],
           "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-",
           "models": []}
    pairs = []
    for q in args.quantized:
        pairs.append((Path(q).name, _export(q, 1, work), _export(q, 2, work)))
    for spec in args.pair:
        name, a, b = spec.split(",")
        pairs.append((name, Path(a), Path(b)))
    for name, a, b in pairs:
        try:
            row = compare(name, a, b, data, args.new_tokens, args.device)
        except Exception:  # noqa: BLE001 - the other models still run
            import traceback

            row = {"model": name, "error": traceback.format_exc()[-2000:]}
        print(json.dumps(row), flush=True)
        if "error" not in row:
            res["models"].append(row)
        else:
            res.setdefault("errors", []).append(row)
        (out / "tp_nccl.json").write_text(json.dumps(res, indent=1))
    res["refusal"] = refusal(pairs[0][2]) if cuda else "not checked (cpu)"
    (out / "tp_nccl.json").write_text(json.dumps(res, indent=1))
    (out / "tp_nccl.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--prompts-n", type=int, default=8)
    r = sub.add_parser("run")
    r.add_argument("--quantized", nargs="*", default=[], help="quantized model directories to export at tp 1 and 2")
    r.add_argument("--pair", action="append", default=[], help="NAME,TP1_DIR,TP2_DIR of existing checkpoints")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/tp_nccl")
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same ranks over gloo (a dry run)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
