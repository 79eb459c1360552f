"""Greedy decoding with the reference model's KV cache (evaluation and tests; serving lives in runtime/)."""

from __future__ import annotations

import torch

from sqdeploy.model.transformer import KVCache, Transformer


@torch.no_grad()
def greedy_generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_ids: set[int] | None = None,
    stop: list[str] | None = None,
    decode=None,
    stop_fn=None,
) -> list[int]:
    """Greedy continuation of one prompt; stops at EOS, at ``max_new_tokens``, when ``decode(ids)`` hits a stop string
    or when ``stop_fn(ids)`` is true."""
    device = next(model.parameters()).device
    cache = KVCache(len(model.layers))
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    logits = model(ids, cache=cache)
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if eos_ids and nxt in eos_ids:
            break
        out.append(nxt)
        if stop and decode is not None and any(s in decode(out) for s in stop):
            break
        if stop_fn is not None and stop_fn(out):
            break
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)
    return out
