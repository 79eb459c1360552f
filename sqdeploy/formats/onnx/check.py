"""``sq-check onnx DIR``: is this export a valid graph that computes what its quantized model computes?

Checks, each a row of the pass/fail table:

1. ``onnx.checker`` full check with strict shape inference (by path, so external data works);
2. the signature in ``sqdeploy-onnx.json`` (names, fixed KV heads / head_dim) matches the graph;
3. QuantizeLinear / DequantizeLinear / MatMulNBits / MatMulInteger counts equal what the
   recorded form implies for its number of quantized MatMuls;
4. ONNX Runtime (CPU) against the PyTorch reference ``load_model(QuantizedModel(ref))``
   on the same windows: top-1 agreement (>= 99%), logits difference (polygraphy's
   comparator), perplexity (within 0.5%); and prefill + decode with the KV cache against one
   full pass. With INT8 activations, whose rounding flips make every correct implementation
   differ from the reference, top-1 and the logits are held to the float64-evaluated
   reference's own distance from the float32 one instead (:mod:`..rounding_noise`).

Exit status 0 when every row passes, 1 otherwise (2 for unusable input).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from sqdeploy.core.report import markdown_table, write_json_atomic
from sqdeploy.evaluate.rounding_noise import RoundingNoise, compare, compare_stats, window_stats
from sqdeploy.formats.onnx.contract import GRAPH, read_manifest
from sqdeploy.formats.onnx.meta import reference_dir
from sqdeploy.formats.onnx.session import OnnxDecoder, SessionConfig

TOP1_MIN = 0.99
PPL_REL_MAX = 0.005
EXACT_REL_MAX = 1e-4  # logits, max |diff| / max |ref|, float32 graphs whose arithmetic is the reference's
KV_QUANT_REL_MAX = 3e-2  # KV-cache row with INT8 activations (rounding flips), as the informational logits row shows


@dataclass
class Row:
    check: str
    ok: bool
    detail: str


STANDARD = (24, 512)  # sq-eval's windows x tokens: perplexities comparable with every table of the README
RANDOM_IDS = (4, 256)  # random ids test the arithmetic only; fewer suffice


def window_setting(args) -> tuple[int, int]:
    """(windows, seq_len) after defaults: the standard ones on text, a smaller set of random ids."""
    default = STANDARD if args.text else RANDOM_IDS
    return (args.windows or default[0], args.seq_len or default[1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sq-check onnx", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="ONNX export directory (sq-export --target onnx)")
    ap.add_argument("--reference", default=None, help="quantized directory to compare with (default: the one recorded)")
    ap.add_argument("--text", default=None, help="held-out text (.txt/.gz) for the windows; default: random token ids")
    ap.add_argument("--windows", type=int, default=None,
                    help=f"windows to compare (default with --text: {STANDARD[0]}, sq-eval's standard and the README's tables; "
                         f"random ids: {RANDOM_IDS[0]})")
    ap.add_argument("--seq-len", type=int, default=None,
                    help=f"tokens per window (default with --text: {STANDARD[1]}; random ids: {RANDOM_IDS[1]})")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime and PyTorch threads")
    ap.add_argument("--exact", action="store_true", help="also run with ONNX Runtime's QDQ fusions off")
    ap.add_argument("--skip-runtime", action="store_true", help="only the graph checks (no reference needed)")
    ap.add_argument("--json", default=None, help="write the results here")
    return ap


def graph_rows(path: Path, meta: dict) -> list[Row]:
    from sqdeploy.formats.onnx.contract import read_graph

    rows = []
    model = read_graph(path / GRAPH)  # first: a truncated file is refused before the checker chokes on it
    try:
        onnx.checker.check_model(str(path / GRAPH), full_check=True)
        rows.append(Row("onnx.checker (full, shape inference)", True, f"opset {meta['opset']}"))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        rows.append(Row("onnx.checker (full, shape inference)", False, str(exc).splitlines()[0][:200]))
    rows.append(_signature_row(model, meta))
    rows.append(_count_row(model, meta))
    return rows


def _signature_row(model: onnx.ModelProto, meta: dict) -> Row:
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    problems = []
    if ins != meta["inputs"] or outs != meta["outputs"]:
        problems.append("input/output names differ from sqdeploy-onnx.json")
    for vi in list(model.graph.input)[3:] + list(model.graph.output)[1:]:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
        if dims[1] != meta["num_kv_heads"] or dims[3] != meta["head_dim"]:
            problems.append(f"{vi.name} has dims {dims}")
            break
    return Row("signature (names, KV layout)", not problems, "; ".join(problems) or f"{len(ins)} inputs, {len(outs)} outputs")


def expected_counts(meta: dict) -> dict[str, int]:
    q = meta["quantization"]
    n = q["quantized_matmuls"]
    scheme = q["scheme"]
    zero = {"QuantizeLinear": 0, "DequantizeLinear": 0, "MatMulNBits": 0, "MatMulInteger": 0}
    if scheme["weight"] is None:
        return zero
    act = scheme["act"]["kind"]
    if act == "static_tensor":
        return {**zero, "QuantizeLinear": n, "DequantizeLinear": 2 * n}
    if act != "none":
        return {**zero, "MatMulInteger": n}
    key = "MatMulNBits" if meta["int4_format"] == "matmulnbits" else "DequantizeLinear"
    return {**zero, key: n + (meta.get("lm_head") == "int8")}


def _count_row(model: onnx.ModelProto, meta: dict) -> Row:
    q = meta["quantization"]
    per_layer = q["quantized_linears"] // max(meta["num_layers"], 1)
    implied = meta["num_layers"] * (per_layer - sum(len(g) - 1 for g in q["fused_linears"])) if per_layer else 0
    got = {k: 0 for k in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits", "MatMulInteger")}
    for node in model.graph.node:
        if node.op_type in got:
            got[node.op_type] += 1
    want = expected_counts(meta)
    ok = got == want and q["quantized_matmuls"] == implied
    detail = ", ".join(f"{k} {got[k]}/{want[k]}" for k in got if got[k] or want[k]) or "no quantization ops (float)"
    detail += f"; {q['quantized_linears']} quantized linears in {q['quantized_matmuls']} MatMuls"
    return Row("quantization op counts", ok, detail)


def windows_for(args, tokenizer_dir: Path, vocab: int) -> torch.Tensor:
    if args.text:
        from sqdeploy.evaluate.perplexity import eval_windows, read_text
        from sqdeploy.model.tokenizer import load_tokenizer

        return eval_windows(load_tokenizer(tokenizer_dir), read_text(args.text), *window_setting(args))
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, window_setting(args), generator=g)


def _nll(logits: torch.Tensor, w: torch.Tensor) -> float:
    """Summed next-token NLL of one window, as :func:`sqdeploy.evaluate.perplexity.perplexity` computes it."""
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return -float(logp.gather(1, w[1:, None]).sum())


def _compare(o: torch.Tensor, r: torch.Tensor) -> float:
    """Max |diff| / max |ref| through polygraphy's comparator (quiet)."""
    from polygraphy.comparator import IterationResult
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    scale = float(r.abs().max())
    cmp = SimpleCompareFunc(rtol=EXACT_REL_MAX, atol=EXACT_REL_MAX * scale, check_shapes=True)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 10):
        res = cmp(IterationResult({"logits": o.numpy()}, runner_name="onnxruntime"),
                  IterationResult({"logits": r.numpy()}, runner_name="reference"))["logits"]
    return float(res.max_absdiff) / scale


def runtime_rows(dec: OnnxDecoder, ref_logits: list[torch.Tensor], windows: torch.Tensor, label: str,
                 exact_math: bool, noise: RoundingNoise | None = None, text: bool = True) -> list[Row]:
    """``noise``: the float64 reference's distance from the float32 one, for graphs with INT8 activations.
    ``text=False``: the windows are random ids, whose perplexity (near the vocabulary size) magnifies
    any difference; it is then shown, not held to the 0.5% bar, which is defined on held-out text."""
    agree = total = 0
    nll_ort = nll_ref = worst = 0.0
    stats = []
    for w, r in zip(windows, ref_logits):
        o = dec.logits_fn(w[None])
        agree += int((o.argmax(-1) == r.argmax(-1)).sum())
        total += w.numel()
        nll_ort, nll_ref = nll_ort + _nll(o, w), nll_ref + _nll(r, w)
        worst = max(worst, _compare(o, r))
        if noise is not None:
            stats.append(window_stats(o, r))
    n = windows.shape[0] * (windows.shape[1] - 1)
    p_ort, p_ref = math.exp(nll_ort / n), math.exp(nll_ref / n)
    ppl = Row(f"{label}: perplexity ({windows.shape[0]} x {windows.shape[1]} {'text' if text else 'random ids'})",
              abs(p_ort / p_ref - 1) <= PPL_REL_MAX or not text,
              f"{p_ort:.4f} vs reference {p_ref:.4f} ({100 * (p_ort / p_ref - 1):+.3f}%, "
              + (f"limit {100 * PPL_REL_MAX:.1f}%)" if text else "random ids: informational; pass --text for the 0.5% bar)"))
    detail = f"max |diff| / max |ref| = {worst:.2e}"
    if noise is not None and noise.saturated:  # INT8 flips everywhere: as far as a correct re-evaluation, no further
        c = compare_stats(stats, noise)
        return [Row(f"{label}: top-1 agreement", c.explained, c.describe_top1()), ppl,
                Row(f"{label}: logits vs INT8 rounding noise", c.within_noise, f"{c.describe()}; {detail}")]
    rows = [Row(f"{label}: top-1 agreement", agree / total >= TOP1_MIN, f"{100 * agree / total:.2f}% of {total} positions "
                f"(>= {100 * TOP1_MIN:.0f}%)"), ppl]
    if exact_math:
        rows.append(Row(f"{label}: logits (exact arithmetic)", worst <= EXACT_REL_MAX, detail + f" (<= {EXACT_REL_MAX:.0e})"))
    else:
        rows.append(Row(f"{label}: logits", True, detail + " (float16 or INT8 activations: informational)"))
    return rows


def kv_cache_row(dec: OnnxDecoder, ids: torch.Tensor, noise: RoundingNoise | None = None) -> Row:
    """Prefill half, decode the rest one token at a time: the logits of one full pass.

    ``noise`` (INT8 activations): the rounding noise measured on windows starting like ``ids``."""
    full, _ = dec.forward(ids.numpy())
    split = ids.shape[1] // 2
    logits, past = dec.forward(ids[:, :split].numpy())
    steps = [logits]
    for t in range(split, ids.shape[1]):
        mask = np.ones((ids.shape[0], t + 1), np.int64)
        logits, past = dec.forward(ids[:, t:t + 1].numpy(), mask, np.full((ids.shape[0], 1), t), past)
        steps.append(logits)
    inc = np.concatenate(steps, axis=1).astype(np.float32)
    full = full.astype(np.float32)
    rel = float(np.abs(inc - full).max() / np.abs(full).max())
    detail = f"{ids.shape[1] - split} decode steps, max rel diff {rel:.2e}"
    if dec.meta["quantization"]["scheme"]["act"]["kind"] != "none":
        # a last-bit difference between the decode and prefill kernels can move one INT8 activation across a
        # rounding boundary; every later token attends to that key, so the logits differ like the reference's do
        if noise is not None and noise.saturated:  # held to the float64 re-evaluation's distance on the same positions
            c = compare([torch.from_numpy(inc)], [torch.from_numpy(full)], noise.first(*ids.shape))
            return Row("KV cache: prefill + decode == full pass", c.within_noise and c.explained,
                       f"{detail}; {c.describe()}; top-1 {c.describe_top1()}")
        top1 = float((inc.argmax(-1) == full.argmax(-1)).mean())
        ok = rel <= KV_QUANT_REL_MAX and top1 >= TOP1_MIN
        return Row("KV cache: prefill + decode == full pass", ok, f"{detail} (<= {KV_QUANT_REL_MAX:.0e}: INT8 activations), "
                   f"top-1 {100 * top1:.2f}% (>= {100 * TOP1_MIN:.0f}%)")
    limit = 1e-3 if dec.meta["dtype"] == "float32" else 1e-2
    return Row("KV cache: prefill + decode == full pass", rel <= limit, f"{detail} (<= {limit:.0e})")


def is_exact_form(meta: dict) -> bool:
    """Float32 graphs without activation quantization compute the reference's arithmetic."""
    act = meta["quantization"]["scheme"]["act"]["kind"]
    return meta["dtype"] == "float32" and act == "none" and meta.get("lm_head", "float") == "float"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.dir)
    meta = read_manifest(path)
    rows = graph_rows(path, meta)
    if not args.skip_runtime:
        from sqdeploy.model.loading import load_model
        from sqdeploy.quantize.qmodel import QuantizedModel

        if args.threads:
            torch.set_num_threads(args.threads)
        ref = load_model(QuantizedModel(reference_dir(path, meta, args.reference)))
        windows = windows_for(args, path, meta["vocab_size"])
        with torch.no_grad():
            ref_logits = [ref(w[None]).float() for w in windows]
        del ref
        noise = None
        if meta["quantization"]["scheme"]["act"]["kind"] != "none":
            ref64 = load_model(QuantizedModel(reference_dir(path, meta, args.reference)), torch.float64)
            with torch.no_grad():
                noise = RoundingNoise.measure(ref_logits, (ref64(w[None]) for w in windows))
            del ref64
        modes = [("ONNX Runtime", False)] + ([("ONNX Runtime, QDQ fusions off", True)] if args.exact else [])
        for label, exact in modes:
            dec = OnnxDecoder(path, SessionConfig(threads=args.threads, exact=exact))
            rows += runtime_rows(dec, ref_logits, windows, label, is_exact_form(meta), noise, bool(args.text))
        rows.append(kv_cache_row(dec, windows[:2, : min(64, windows.shape[1])], noise))
    print(markdown_table(["check", "result", "detail"], [[r.check, "PASS" if r.ok else "FAIL", r.detail] for r in rows]))
    ok = all(r.ok for r in rows)
    print(f"\n{path}: {'all checks passed' if ok else 'FAILED'}")
    if args.json:
        write_json_atomic(args.json, {"dir": str(path), "ok": ok, "rows": [r.__dict__ for r in rows], "meta": meta})
    return 0 if ok else 1
