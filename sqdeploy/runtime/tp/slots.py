"""One rank's share of a server's KV cache: the kernel backend's slot cache over the rank's own heads.

The server process keeps the bookkeeping (which slot is free, how long each is) and sends
every rank the same commands in the same order: run a prompt chunk of one slot, decode
the decoding slots, forget the slots whose requests ended. Each rank holds the keys and
values of its own KV heads only; the collectives inside the model (row-parallel
all-reduces, the vocabulary-parallel embedding and LM head) keep the ranks in step, and
the gathered logits of rank 0 are all that goes back to the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from sqdeploy.kernels.slots import SlotCache, SlotDecoder, kv_bytes_per_token, plan_slots, prefill_chunk
from sqdeploy.runtime.backends.kernel import KernelConfig, kv_budget


def agree_on_slots(slots: int, device: torch.device) -> int:
    """The smallest slot count any rank can hold (GPUs may have different amounts of free memory)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return slots
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([slots], dtype=torch.long, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class RankSlots:
    """The slot cache and decode steps of one rank; every method is a collective (all ranks call it)."""

    def __init__(self, model, config: KernelConfig, log=print):
        cfg = model.cfg
        self.model = model
        self.device = model.embed.weight.device
        max_len = min(cfg.max_positions, config.max_model_len or cfg.max_positions)
        plan = plan_slots(kv_bytes_per_token(model), max_len, config.max_batch_size,
                          kv_budget(model, self.device, config))
        plan = dataclasses.replace(plan, slots=agree_on_slots(plan.slots, self.device))
        self.cache = SlotCache(model, plan)
        self.decoder = SlotDecoder(model, self.cache, config.cuda_graphs, log)
        if config.capture_at_start:
            self.decoder.capture_all()

    def forget(self, slots: Sequence[int]) -> None:
        """Slots whose requests ended: only their lengths and flags are reset."""
        c = self.cache
        for s in slots:
            c.host_lengths[s] = 0
            c.lengths[s] = 0
            c.active[s] = 0

    def prefill(self, slot: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Float32 logits [V] of the chunk's last token (every rank holds them, gathered)."""
        return prefill_chunk(self.model, self.cache, slot, torch.tensor(list(ids), dtype=torch.long), start)

    @torch.no_grad()
    def decode(self, slots: Sequence[int], next_ids: Sequence[int]) -> torch.Tensor:
        """One decode step of ``slots`` fed ``next_ids``; float32 logits [len(slots), V] in their order."""
        c = self.cache
        idx = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        c.active.zero_()
        c.active[idx] = 1
        c.next_ids[idx] = torch.tensor(list(next_ids), dtype=torch.long, device=self.device)
        return self.decoder.step(list(slots)).index_select(0, idx)

    def decode_greedy(self, slots: Sequence[int], next_ids: Sequence[int]) -> torch.Tensor:
        """One decode step whose rows all decode greedily: their next ids [len(slots)], not the logits."""
        return self.decode(slots, next_ids).argmax(dim=-1)

    def describe(self) -> dict:
        p = self.cache.plan
        return {"slots": p.slots, "max_len": p.max_len, "plan": p.describe()}
