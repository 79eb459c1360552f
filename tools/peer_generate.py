"""Greedy generation through another tool's loader, run in that tool's own environment.

    PY tools/peer_generate.py optimum|genai DIR --prompts '[[1, 5, 9], [1, 7]]' --max-new-tokens 16

Prints a JSON list: per prompt, the generated token ids (the prompt excluded), up to and
including the first end-of-sequence token. Imports only the peer's packages (and numpy), so
it runs in a virtual environment that has the peer's pins and no sq-deploy (tools/peer_envs.sh).

* optimum: ``ORTModelForCausalLM.from_pretrained(DIR)``, all prompts in one left-padded batch
  (``generate`` with ``do_sample=False``).
* genai: ``onnxruntime_genai.Model(DIR)``, one prompt at a time, greedy search options.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[: k + 1]
    return tokens


def _eos_ids(value) -> set[int]:
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {int(value)}


def optimum(path: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(path)
    eos = _eos_ids(model.generation_config.eos_token_id)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else min(eos)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=0, do_sample=False,
                         num_beams=1, pad_token_id=pad)
    return [_cut(row[width:].tolist(), eos) for row in out]


def genai(path: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    import onnxruntime_genai as og

    with open(f"{path}/genai_config.json") as f:
        eos = _eos_ids(json.load(f)["model"]["eos_token_id"])
    model = og.Model(path)
    results = []
    for p in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(p) + max_new, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([p])
        while not gen.is_done():
            gen.generate_next_token()
        results.append(_cut([int(t) for t in gen.get_sequence(0)][len(p):], eos))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tool", choices=["optimum", "genai"])
    ap.add_argument("dir")
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    run = optimum if args.tool == "optimum" else genai
    json.dump(run(args.dir, json.loads(args.prompts), args.max_new_tokens), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
