"""The same export on two devices, tensor for tensor: do a GPU and a CPU write the same integers?

Quantizes a model with each recipe once per ``--devices`` entry (``sq-export``'s own pipeline,
``--target quantized``) and compares the written directories tensor by tensor: integer tensors
(INT8 weights, packed INT4 words unpacked to nibbles, zero points) by the count of differing
values and the largest difference in quantization steps; float tensors (scales, smoothed norms,
embeddings) by the largest relative difference. The algorithms are the same on every device; what
may differ is float arithmetic (summation order of GEMMs and reductions, cuBLAS against the CPU's
BLAS), which moves a value that sits on a rounding boundary by one step. The report states, per
recipe, how many values moved and by how much, and whether the search chose the same plan.

    python tools/export_device_parity.py ../shared/models/tiny-code-llama --calib ../shared/data/humaneval.jsonl.gz \\
        --recipes w8a8-sq,w4a16-sqplus --devices cpu,cuda --out reports/parity

Writes ``device-parity.json`` and ``device-parity.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unpack_nibbles(words):
    """int32 words of eight 4-bit values (compressed-tensors' packing, low nibble first) -> int8 [.., 8 x]."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (words.to(torch.int32)[..., None] >> shifts) & 0xF
    return nib.reshape(*words.shape[:-1], words.shape[-1] * 8).to(torch.int8)


def load_dir(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def compare(a: dict, b: dict) -> dict:
    """Per-tensor differences of two quantized directories' tensors, summed by kind."""
    import torch

    out = {"only_in_first": sorted(set(a) - set(b)), "only_in_second": sorted(set(b) - set(a)), "integer": {},
           "float": {}}
    moved = total = 0
    worst_step = 0
    worst_rel, worst_name = 0.0, None
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            out.setdefault("shape_mismatch", []).append(name)
            continue
        if not x.is_floating_point():
            if name.endswith(("weight_packed", "weight_zero_point")) and x.dtype == torch.int32:
                x, y = unpack_nibbles(x), unpack_nibbles(y)
            d = (x.to(torch.int64) - y.to(torch.int64)).abs()
            n = int((d > 0).sum())
            moved, total = moved + n, total + d.numel()
            worst_step = max(worst_step, int(d.max()) if d.numel() else 0)
            if n:
                out["integer"][name] = {"moved": n, "of": d.numel(), "max_steps": int(d.max())}
        else:
            xf, yf = x.double(), y.double()
            rel = float(((xf - yf).abs() / yf.abs().clamp_min(1e-12)).max()) if xf.numel() else 0.0
            if rel > worst_rel:
                worst_rel, worst_name = rel, name
            if rel > 0:
                out["float"][name] = rel
    out["summary"] = {"integer_values": total, "moved": moved, "moved_fraction": moved / max(total, 1),
                      "max_steps": worst_step, "float_max_rel": worst_rel, "float_worst": worst_name}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calib", default="humaneval")
    ap.add_argument("--recipes", default="w8a8-sq,w4a16-sqplus")
    ap.add_argument("--devices", default="cpu,cuda", help="two devices, comma-separated (default cpu,cuda)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from sqdeploy.core.report import cpu_model, markdown_table, write_json_atomic
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir

    devices = args.devices.split(",")
    if len(devices) != 2:
        ap.error("--devices takes two devices")
    rows, report = [], {"command": "python tools/export_device_parity.py " + " ".join(argv or sys.argv[1:]),
                        "cpu": cpu_model(), "recipes": {}}
    import torch

    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            dirs, plans, seconds = [], [], []
            for k, dev in enumerate(devices):
                t0 = time.perf_counter()
                out, result = quantize_to_dir(args.model, recipe, Path(tmp) / f"{recipe}-{k}", Calibration(args.calib),
                                              Runtime(device=dev, progress=False))
                seconds.append(round(time.perf_counter() - t0, 1))
                dirs.append(out)
                plans.append((result.search or {}).get("plan_name"))
            diff = compare(load_dir(dirs[0]), load_dir(dirs[1]))
            diff.update(plans=plans, seconds=seconds, same_plan=plans[0] == plans[1])
            report["recipes"][recipe] = diff
            s = diff["summary"]
            rows.append([f"`{recipe}`", " / ".join(map(str, seconds)), "yes" if diff["same_plan"] else f"no: {plans}",
                         f"{s['moved']} of {s['integer_values']} ({s['moved_fraction']:.2e})", s["max_steps"],
                         f"{s['float_max_rel']:.2e} ({s['float_worst']})"])
            print(f"{recipe}: {s}", flush=True)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(outdir / "device-parity.json", report)
    table = markdown_table([f"recipe", f"seconds ({' / '.join(devices)})", "same smoothing plan",
                            "integer values that differ", "largest difference (steps)", "largest float relative difference"],
                           rows)
    (outdir / "device-parity.md").write_text(f"# {devices[0]} against {devices[1]}, tensor for tensor\n\n"
                                             f"`{report['command']}`; CPU {report['cpu']}"
                                             + (f", GPU {report['gpu']}" if "gpu" in report else "") + f"\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
