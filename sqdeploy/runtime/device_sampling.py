"""Next-token choice on the device: only the sampled ids cross to the host.

The same rules as :mod:`sqdeploy.runtime.sampling` (greedy, temperature, top-k, top-p,
``min_tokens``, ``repetition_penalty``), computed on the logits where they are, for all
rows of a step at once. A row with a ``seed`` draws from its own generator (one uniform
number per sampled token), so its tokens do not depend on what else shares the batch;
rows without one share the sampler's generator.

Sampling keeps the ``top_k`` most likely tokens, then the smallest prefix of them (by
probability) whose mass reaches ``top_p``, renormalises and inverts the cumulative
distribution at a uniform draw: the host sampler's procedure, in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sqdeploy.runtime.engine import SamplingParams
from sqdeploy.runtime.sampling import History, needs_constraints


class DeviceSampler:
    """Per-request generators live here, keyed by request id, until :meth:`forget`."""

    def __init__(self, device: torch.device | str, seed: int | None = None):
        self.device = torch.device(device)
        self.shared = torch.Generator(device=self.device)
        if seed is None:
            self.shared.seed()
        else:
            self.shared.manual_seed(seed)
        self._gens: dict[int, torch.Generator] = {}

    def generator(self, key: int, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self.shared
        g = self._gens.get(key)
        if g is None:
            g = self._gens[key] = torch.Generator(device=self.device).manual_seed(int(params.seed))
        return g

    def forget(self, key: int) -> None:
        self._gens.pop(key, None)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[int],
               histories: Sequence[History] | None = None) -> list[int]:
        """Token ids for the rows of ``logits`` [B, V] (float32, on the device): one transfer to the host."""
        return self.sample_tensor(logits, params, keys, histories).tolist()

    @torch.no_grad()
    def sample_tensor(self, logits: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[int],
                      histories: Sequence[History] | None = None) -> torch.Tensor:
        x = logits.float()
        constrained = [i for i, p in enumerate(params) if histories is not None and needs_constraints(p, histories[i])]
        if constrained:
            x = x.clone()
            for i in constrained:
                x[i] = constrain_row(x[i], params[i], histories[i])
        out = x.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            u = torch.stack([torch.rand((), generator=self.generator(keys[i], params[i]), device=self.device)
                             for i in sampled])
            idx = torch.tensor(sampled, device=x.device)
            out[idx] = sample_rows(x[idx], [params[i] for i in sampled], u)
        return out


def constrain_row(row: torch.Tensor, params: SamplingParams, history: History) -> torch.Tensor:
    """Repetition penalty and the ``min_tokens`` end-of-sequence mask on one row [V] (see ``sampling.constrain``)."""
    v = row.shape[0]
    row = row.clone()
    if params.repetition_penalty != 1.0 and history.seen:
        ids = torch.tensor([i for i in history.seen if i < v], dtype=torch.long, device=row.device)
        got = row[ids]
        row[ids] = torch.where(got > 0, got / params.repetition_penalty, got * params.repetition_penalty)
    if len(history.tokens) < params.min_tokens:
        eos = [i for i in history.eos_ids if i < v]
        if eos:
            row[torch.tensor(eos, dtype=torch.long, device=row.device)] = float("-inf")
    return row


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Sorted token ids [B, V] and their probabilities after temperature, top-k and top-p (rows sum to 1).

    ``top_k`` 0 keeps every token, ``top_p`` 1 keeps every token the top-k left.
    """
    x = logits / temperature[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    v = x.shape[-1]
    rank = torch.arange(v, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    sorted_x = sorted_x.masked_fill(rank >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    keep = (before < top_p[:, None]) | (rank == 0)
    probs = probs.masked_fill(~keep, 0.0)
    return order, probs / probs.sum(dim=-1, keepdim=True)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """One token per row from ``logits`` [B, V] at uniform draws ``u`` [B]."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    order, probs = filter_probs(logits, temp, top_k, top_p)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, u[:, None].to(cdf.dtype), right=True).clamp(max=cdf.shape[-1] - 1)
    # a draw past the last kept token's cumulative mass (float rounding) takes the last kept token
    kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
    idx = torch.minimum(idx, kept)
    return order.gather(1, idx)[:, 0]
