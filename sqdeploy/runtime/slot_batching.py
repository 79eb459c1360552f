"""Continuous batching over a backend that owns a slot KV cache (the kernel backend).

Each request gets a cache slot when one is free and keeps it until it ends. A step

1. retires finished and cancelled rows (their slots go back, nobody else's cache moves),
2. admits waiting requests while slots are free,
3. feeds prompts in chunks, at most ``max_prefill_tokens`` tokens in all per step, oldest
   request first, so a long prompt holds the running rows up for one chunk at a time; chunks of
   the same start and length (prompts admitted together) run as one batch,
4. decodes one token for every row whose prompt is complete.

Sampling happens on the device; each step only the sampled ids reach the host, where
:class:`~sqdeploy.runtime.sequence.Sequence` turns them into events exactly as for the
other backends (stop strings, lengths, detokenization).
"""

from __future__ import annotations

import collections
import time
import traceback
from dataclasses import dataclass

import torch

from sqdeploy.runtime.engine import TokenEvent
from sqdeploy.runtime.sampling import needs_constraints
from sqdeploy.runtime.sequence import Sequence


@dataclass
class Row:
    seq: Sequence
    slot: int
    done: int = 0  # prompt tokens already in the cache


def plan_chunks(remaining: list[int], budget: int) -> list[int]:
    """Tokens each prefilling row (oldest first) gets this step from a shared ``budget``."""
    out = []
    for r in remaining:
        n = min(r, budget)
        out.append(n)
        budget -= n
    return out


class SlotScheduler:
    """Single-threaded like :class:`~sqdeploy.runtime.batching.Scheduler`, with the same surface for the engine."""

    def __init__(self, backend, config):  # a batching.BatchConfig
        self.backend, self.config = backend, config
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Row] = []
        self.decoding: list[Row] = []
        self.steps = {"prefill_chunks": 0, "prefill_batches": 0, "prefill_tokens": 0, "decode_steps": 0, "decode_rows": 0}

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def in_flight(self) -> list[Sequence]:
        return [r.seq for r in (*self.prefilling, *self.decoding)]

    def step(self) -> list[TokenEvent]:
        events = self._retire()
        events += self._drop_cancelled_waiting()
        events += self._admit()
        if self.prefilling:
            events += self._prefill()
            events += self._retire()
        if self.decoding:
            events += self._guarded(list(self.decoding), self._decode)
            events += self._retire()
        return events

    def _guarded(self, rows: list[Row], fn) -> list[TokenEvent]:
        """Run a model step; if it fails, fail those rows (not the server) and free their slots."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported to each affected request
            msg = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            return [r.seq.finish("error", error=msg) for r in rows if r.seq.finish_reason is None]

    def _drop_cancelled_waiting(self) -> list[TokenEvent]:
        if not any(s.cancelled for s in self.waiting):
            return []
        gone = [s for s in self.waiting if s.cancelled]
        self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        return [s.finish("cancelled") for s in gone]

    def _admit(self) -> list[TokenEvent]:
        events = []
        limit = self.backend.info.max_positions
        now = time.perf_counter()
        while self.waiting and self.running < self.config.max_batch_size and self.backend.free_slots() > 0:
            s = self.waiting.popleft()
            s.timings.scheduled = now
            need = len(s.request.prompt_ids) + s.params.max_new_tokens
            if need > limit:
                events.append(s.finish("error", error=f"the request needs {need} positions; the KV cache holds "
                                                       f"{limit} per sequence: shorten the prompt or lower max_tokens"))
                continue
            self.prefilling.append(Row(s, self.backend.acquire()))
        return events

    def _prefill(self) -> list[TokenEvent]:
        """This step's prompt chunks. Rows whose chunks start at the same position and have the same length
        (prompts admitted together, most often) go through the model as one batch when the backend can
        (``prefill_rows``): one GEMM per linear for all of them instead of one per row."""
        rows = [r for r in self.prefilling if r.seq.finish_reason is None]
        chunks = plan_chunks([len(r.seq.request.prompt_ids) - r.done for r in rows], self.config.max_prefill_tokens)
        groups: dict[tuple[int, int], list[Row]] = {}
        for row, n in zip(rows, chunks):
            if n == 0:
                break
            groups.setdefault((row.done, n) if hasattr(self.backend, "prefill_rows") else (id(row), n), []).append(row)
        ready: list[tuple[Row, torch.Tensor]] = []
        events: list[TokenEvent] = []
        for (_, n), members in groups.items():
            ids = [r.seq.request.prompt_ids[r.done : r.done + n] for r in members]
            try:
                if len(members) == 1:
                    logits = [self.backend.prefill(members[0].slot, ids[0], members[0].done)]
                else:
                    logits = list(self.backend.prefill_rows([r.slot for r in members], ids, members[0].done))
            except Exception as exc:  # noqa: BLE001 - only these requests fail
                traceback.print_exc()
                events += [r.seq.finish("error", error=f"{type(exc).__name__}: {exc}") for r in members]
                continue
            self.steps["prefill_chunks"] += len(members)
            self.steps["prefill_batches"] += 1
            self.steps["prefill_tokens"] += n * len(members)
            for row, lg in zip(members, logits):
                row.done += n
                if row.done == len(row.seq.request.prompt_ids):
                    ready.append((row, lg))
        if ready:
            events += self._guarded([r for r, _ in ready], lambda: self._first_tokens(ready))
        return events

    def _first_tokens(self, ready: list[tuple[Row, torch.Tensor]]) -> list[TokenEvent]:
        rows = [r for r, _ in ready]
        logits = torch.stack([lg for _, lg in ready])
        seqs = [r.seq for r in rows]
        toks = self.backend.sampler.sample_tensor(logits, [s.params for s in seqs], [s.request_id for s in seqs], seqs)
        idx = torch.tensor([r.slot for r in rows], dtype=torch.long, device=toks.device)
        self.backend.set_next(idx, toks)
        done = {id(r) for r in rows}
        self.prefilling = [r for r in self.prefilling if id(r) not in done]
        self.decoding += rows
        return [s.append(t) for s, t in zip(seqs, toks.tolist())]

    def _decode(self) -> list[TokenEvent]:
        rows = self.decoding
        seqs = [r.seq for r in rows]
        slots = [r.slot for r in rows]
        greedy = getattr(self.backend, "decode_greedy", None)  # ids only: less to move (tensor-parallel ranks)
        if greedy is not None and all(s.params.greedy and not needs_constraints(s.params, s) for s in seqs):
            toks = greedy(slots)
        else:
            logits = self.backend.decode(slots)
            toks = self.backend.sampler.sample_tensor(logits, [s.params for s in seqs], [s.request_id for s in seqs],
                                                      seqs)
        self.backend.set_next(self.backend.slot_index(slots), toks)
        self.steps["decode_steps"] += 1
        self.steps["decode_rows"] += len(rows)
        return [s.append(t) for s, t in zip(seqs, toks.tolist())]

    def _retire(self) -> list[TokenEvent]:
        """Finish cancelled rows; give the slots of every ended row back."""
        events = []
        for rows in (self.prefilling, self.decoding):
            for r in rows:
                if r.seq.finish_reason is None and r.seq.cancelled:
                    events.append(r.seq.finish("cancelled"))
        for name in ("prefilling", "decoding"):
            rows = getattr(self, name)
            ended = [r for r in rows if r.seq.finish_reason is not None]
            if ended:
                for r in ended:
                    self.backend.release(r.slot)
                    self.backend.sampler.forget(r.seq.request_id)
                setattr(self, name, [r for r in rows if r.seq.finish_reason is None])
        return events
