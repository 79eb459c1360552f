"""Decode tokens/s of an ONNX Runtime GenAI model with GenAI's own runtime (run in GenAI's virtual environment).

    /work/venvs/genai/bin/python tools/bench_genai_runtime.py GENAI_DIR --threads 2 --decode 128 --prompt-ids 1,2,3

Prints one JSON line: prefill and decode tokens/s (batch 1).
"""

from __future__ import annotations

import argparse
import json
import time

import onnxruntime_genai as og


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompt = [int(x) for x in args.prompt_ids.split(",")]
    config = og.Config(args.model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads,
                                                                         "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    best_decode, best_prefill = float("inf"), float("inf")
    for _ in range(args.repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + args.decode + 1, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        for _ in range(args.decode):
            gen.generate_next_token()
        t2 = time.perf_counter()
        best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    print(json.dumps({"prefill_tok_s_genai_runtime": len(prompt) / best_prefill, "decode_b1_tok_s": args.decode / best_decode,
                      "runtime": "onnxruntime-genai " + og.__version__}))


if __name__ == "__main__":
    main()
