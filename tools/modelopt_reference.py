"""Export reference TensorRT-LLM checkpoints with NVIDIA ModelOpt and record their layout.

ModelOpt's ``export_tensorrt_llm_checkpoint`` is the producer TensorRT-LLM's own
``convert_checkpoint.py`` delegates W8A8 SmoothQuant and INT4 AWQ to, so its output is
the layout sq-deploy's ``--target trtllm`` must reproduce. This script quantizes a
model with ModelOpt on the CPU (INT8 SmoothQuant, INT4 AWQ), exports the
checkpoints at the requested tensor-parallel sizes and writes, per checkpoint, a small
JSON manifest (config + every tensor's name, shape and dtype per rank) that the test
suite compares sq-deploy's checkpoints with when ModelOpt is not installed.

    python tools/modelopt_reference.py ../shared/models/tiny-code-llama --out /tmp/modelopt \\
        --manifests tests/data --calib ../shared/data/humaneval.jsonl.gz

Needs ``pip install nvidia-modelopt requests`` (CPU is enough).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# (ModelOpt config name, quant_algo it exports, tensor-parallel sizes)
EXPORTS = {
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", (1, 2)),
    "int4_awq": ("INT4_AWQ_CFG", "W4A16_AWQ", (1,)),
}


def manifest_of(ckpt: Path) -> dict:
    """config.json plus {rank: {name: [shape, dtype]}} of a TensorRT-LLM checkpoint."""
    from safetensors import safe_open

    config = json.loads((ckpt / "config.json").read_text())
    ranks = {}
    for r in range(config["mapping"]["world_size"]):
        with safe_open(ckpt / f"rank{r}.safetensors", "pt") as f:
            ranks[str(r)] = {k: [list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()] for k in sorted(f.keys())}
    return {"producer": config.get("producer"), "config": config, "ranks": ranks}


def hf_manifest_of(ckpt: Path) -> dict:
    """hf_quant_config.json, config.json's quantization_config and every tensor of a unified HF checkpoint."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({k: [list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()] for k in f.keys()})
    config = json.loads((ckpt / "config.json").read_text())
    return {
        "hf_quant_config": json.loads((ckpt / "hf_quant_config.json").read_text()),
        "quantization_config": config.get("quantization_config"),
        "tensors": dict(sorted(tensors.items())),
    }


def calibration_batches(model_dir: Path, calib: str, samples: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from sqdeploy.quantize.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(model_dir)
    return build_calibration(tok, calib, samples, seq_len).ids


def quantize(model_dir: Path, cfg_name: str, ids: torch.Tensor):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def forward_loop(m):
        with torch.no_grad():
            for row in ids.split(4):
                m(row)

    return mtq.quantize(model, getattr(mtq, cfg_name), forward_loop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="HF Llama model directory")
    ap.add_argument("--out", type=Path, required=True, help="directory for the exported checkpoints")
    ap.add_argument("--manifests", type=Path, default=None, help="also write modelopt_<algo>_tp<N>.json here")
    ap.add_argument("--calib", default="humaneval", help="calibration source (as sq-export --calib)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--only", choices=sorted(EXPORTS), action="append", help="restrict to these exports")
    ap.add_argument("--hf", action="store_true", help="also export int4_awq as ModelOpt's unified HF checkpoint")
    args = ap.parse_args(argv)
    try:
        from modelopt.torch.export import export_tensorrt_llm_checkpoint
    except ImportError:
        print("modelopt_reference: needs 'pip install nvidia-modelopt requests'", file=sys.stderr)
        return 2
    ids = calibration_batches(args.model, args.calib, args.calib_samples, args.calib_seq_len)
    for key in args.only or sorted(EXPORTS):
        cfg_name, algo, tps = EXPORTS[key]
        t0 = time.perf_counter()
        model = quantize(args.model, cfg_name, ids)
        for tp in tps:
            out = args.out / f"{key}-tp{tp}"
            export_tensorrt_llm_checkpoint(model, "llama", torch.float16, out, inference_tensor_parallel=tp)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (args.model / name).exists():
                    (out / name).write_bytes((args.model / name).read_bytes())
            man = manifest_of(out)
            assert man["config"]["quantization"]["quant_algo"] == algo, man["config"]["quantization"]
            if args.manifests is not None:
                args.manifests.mkdir(parents=True, exist_ok=True)
                path = args.manifests / f"modelopt_{key}_tp{tp}.json"
                path.write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
            print(f"{key} tp{tp}: {out} ({time.perf_counter() - t0:.0f} s)")
        if args.hf and key == "int4_awq":
            from modelopt.torch.export import export_hf_checkpoint

            out = args.out / f"{key}-hf"
            export_hf_checkpoint(model, torch.float16, out)
            if args.manifests is not None:
                path = args.manifests / f"modelopt_{key}_hf.json"
                path.write_text(json.dumps(hf_manifest_of(out), indent=1, sort_keys=True) + "\n")
            print(f"{key} unified HF: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
