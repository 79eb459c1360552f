"""Continuous batching over a step backend.

Running sequences share one KV cache, left-padded to a common length, with an
attention mask marking each row's real tokens; positions count real tokens only, so
a row computes exactly what it would alone. Every step first admits waiting requests
into free slots (one prefill for all of them, merged into the batch by padding the
shorter cache on the left), then decodes one token for every running row. A row that
finishes leaves at once and the cache columns no row needs any more are dropped, so
its slot goes to the next waiting request at the next step.

The model runs in one worker thread; :meth:`BatchingEngine.submit` only queues, so an
event loop that calls it is never blocked by inference.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from sqdeploy.runtime.backends.base import StepBackend
from sqdeploy.runtime.engine import EngineInfo, EventSink, GenerationRequest, InvalidRequestError, TokenEvent
from sqdeploy.runtime.sampling import sample
from sqdeploy.runtime.sequence import Sequence


@dataclass(frozen=True)
class BatchConfig:
    """``max_batch_size`` rows decode together; one prefill takes at most ``max_prefill_tokens`` padded tokens."""

    max_batch_size: int = 8
    max_prefill_tokens: int = 4096

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_prefill_tokens < 1:
            raise InvalidRequestError("max batch size and max prefill tokens must be >= 1")


class Batch:
    """The running rows, their shared cache, its key mask [B, L] and each row's next input token."""

    def __init__(self, seqs: list[Sequence], cache, mask: np.ndarray, last: np.ndarray):
        self.seqs, self.cache, self.mask, self.last = seqs, cache, mask, last

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Decides who runs each step; single-threaded (the engine's worker calls :meth:`step`)."""

    def __init__(self, backend: StepBackend, config: BatchConfig):
        self.backend, self.config = backend, config
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.batch: Batch | None = None

    @property
    def running(self) -> int:
        return 0 if self.batch is None else len(self.batch)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def in_flight(self) -> list[Sequence]:
        return [] if self.batch is None else list(self.batch.seqs)

    def step(self) -> list[TokenEvent]:
        events = self._retire()
        events += self._drop_cancelled_waiting()
        new = self._admit()
        if new:
            events += self._guarded(new, lambda: self._prefill(new))
            events += self._retire()
        if self.batch is not None:
            events += self._guarded(self.batch.seqs, self._decode)
            events += self._retire()
        return events

    def _guarded(self, seqs: list[Sequence], fn) -> list[TokenEvent]:
        """Run a model step; if the backend fails, fail those rows (not the server) and reset the batch."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported to each affected request
            msg = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            victims = {id(s): s for s in [*seqs, *(self.batch.seqs if self.batch else [])]}
            self.batch = None
            return [s.finish("error", error=msg) for s in victims.values() if s.finish_reason is None]

    def _drop_cancelled_waiting(self) -> list[TokenEvent]:
        if not any(s.cancelled for s in self.waiting):
            return []
        gone = [s for s in self.waiting if s.cancelled]
        self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        return [s.finish("cancelled") for s in gone]

    def _admit(self) -> list[Sequence]:
        free = self.config.max_batch_size - self.running
        new: list[Sequence] = []
        longest = 0
        while self.waiting and len(new) < free:
            n = len(self.waiting[0].request.prompt_ids)
            if new and max(longest, n) * (len(new) + 1) > self.config.max_prefill_tokens:
                break
            longest = max(longest, n)
            new.append(self.waiting.popleft())
        now = time.perf_counter()
        for s in new:
            s.timings.scheduled = now
        return new

    def _prefill(self, seqs: list[Sequence]) -> list[TokenEvent]:
        lens = [len(s.request.prompt_ids) for s in seqs]
        t = max(lens)
        ids = np.full((len(seqs), t), self.backend.info.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), t), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, t - lens[i] :] = s.request.prompt_ids
            mask[i, t - lens[i] :] = 1
        pos = np.clip(mask.cumsum(axis=1) - 1, 0, None)
        logits, cache = self.backend.forward(ids, mask, pos, None)
        tokens = sample(logits, [s.params for s in seqs], [s.rng for s in seqs], seqs)
        self._merge(Batch(seqs, cache, mask, np.asarray(tokens, dtype=np.int64)))
        return [s.append(tok) for s, tok in zip(seqs, tokens)]

    def _merge(self, new: Batch) -> None:
        old = self.batch
        if old is None:
            self.batch = new
            return
        length = max(old.mask.shape[1], new.mask.shape[1])
        parts = [(b, length - b.mask.shape[1]) for b in (old, new)]
        cache = self.backend.concat([self.backend.pad_left(b.cache, n) for b, n in parts])
        mask = np.concatenate([np.pad(b.mask, ((0, 0), (n, 0))) for b, n in parts], axis=0)
        self.batch = Batch(old.seqs + new.seqs, cache, mask, np.concatenate([old.last, new.last]))

    def _decode(self) -> list[TokenEvent]:
        b = self.batch
        mask = np.concatenate([b.mask, np.ones((len(b), 1), dtype=np.int64)], axis=1)
        pos = b.mask.sum(axis=1, keepdims=True)
        logits, b.cache = self.backend.forward(b.last[:, None], mask, pos, b.cache)
        b.mask = mask
        tokens = sample(logits, [s.params for s in b.seqs], [s.rng for s in b.seqs], b.seqs)
        b.last = np.asarray(tokens, dtype=np.int64)
        return [s.append(tok) for s, tok in zip(b.seqs, tokens)]

    def _retire(self) -> list[TokenEvent]:
        """Remove finished and cancelled rows and the cache columns nobody needs any more."""
        b = self.batch
        if b is None:
            return []
        events = [s.finish("cancelled") for s in b.seqs if s.finish_reason is None and s.cancelled]
        keep = [i for i, s in enumerate(b.seqs) if s.finish_reason is None]
        if len(keep) == len(b):
            return events
        if not keep:
            self.batch = None
            return events
        mask = b.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))
        cache = self.backend.trim(self.backend.take(b.cache, keep), start)
        self.batch = Batch([b.seqs[i] for i in keep], cache, np.ascontiguousarray(mask[:, start:]), b.last[keep])
        return events


class BatchingEngine:
    """An :class:`~sqdeploy.runtime.engine.Engine` over a step backend (or a slot backend, scheduled by
    :class:`~sqdeploy.runtime.slot_batching.SlotScheduler`), with its worker thread."""

    def __init__(self, backend: StepBackend, config: BatchConfig = BatchConfig(), name: str | None = None,
                 close_backend: bool = True):
        """``close_backend``: :meth:`shutdown` also calls the backend's ``close()`` where it has one (the
        tensor-parallel backend stops its rank processes there)."""
        self.backend, self._close_backend = backend, close_backend
        self.tokenizer = backend.tokenizer
        i = backend.info
        self.info = EngineInfo(name or i.path.name, i.path, backend.name, i.description, i.max_positions, i.vocab_size)
        if getattr(backend, "slot_based", False):  # owns a slot KV cache (the kernel backend)
            from sqdeploy.runtime.slot_batching import SlotScheduler

            self.scheduler = SlotScheduler(backend, config)
        else:
            self.scheduler = Scheduler(backend, config)
        self._incoming: list[tuple[Sequence, EventSink]] = []
        self._sinks: dict[int, EventSink] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._drain = True
        self._activity = {"steps": 0, "step_s": 0.0, "deliver_s": 0.0, "idle_s": 0.0, "tokens": 0}
        self._idle_since: float | None = None  # the worker waits for work since then
        self._activity_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="sq-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: Seq[GenerationRequest], sink: EventSink) -> list[Sequence]:
        seqs = [Sequence(r, sink, self.tokenizer, self.backend.info.eos_ids) for r in requests]
        with self._cv:
            if self._stopping:
                raise InvalidRequestError("the engine is shutting down; retry on another replica")
            self._incoming.extend((s, sink) for s in seqs)
            self._cv.notify()
        return seqs

    def stats(self) -> dict[str, int]:
        return {"waiting": len(self._incoming) + len(self.scheduler.waiting), "running": self.scheduler.running}

    def activity(self) -> dict[str, float]:
        """Cumulative worker time: in model steps (``step_s``, scheduling and the host's share of the
        step included), handing events to servers (``deliver_s``) and waiting for work (``idle_s``),
        with the steps and tokens, plus the scheduler's own counters where it keeps them, and the
        monotonic clock at the reading (``clock_s``). Differences of two readings show where a served
        run's time went next to an offline one."""
        with self._activity_lock:
            out = dict(self._activity, clock_s=time.perf_counter())  # differences give the readings' window
            if self._idle_since is not None:  # the wait in progress counts up to now
                out["idle_s"] += out["clock_s"] - self._idle_since
        return {**out, **getattr(self.scheduler, "steps", {})}

    @property
    def healthy(self) -> bool:
        """False once the backend can no longer run a step (a tensor-parallel rank died): not ready."""
        return bool(getattr(self.backend, "healthy", True))

    def shutdown(self, drain: bool = True) -> None:
        """Stop the worker: finish every queued and running request first when ``drain``, else cancel them."""
        with self._cv:
            self._stopping, self._drain = True, drain
            self._cv.notify()
        self._thread.join()
        close = getattr(self.backend, "close", None)
        if self._close_backend and close is not None:
            close()

    def _loop(self) -> None:
        a, lock = self._activity, self._activity_lock
        while True:
            with lock:
                self._idle_since = time.perf_counter()
            with self._cv:
                while not (self._incoming or self.scheduler.has_work() or self._stopping):
                    self._cv.wait()
                for s, sink in self._incoming:
                    self._sinks[s.request_id] = sink
                    self.scheduler.waiting.append(s)
                self._incoming.clear()
                if self._stopping and not self._drain:
                    for s in [*self.scheduler.waiting, *self.scheduler.in_flight()]:
                        s.cancel()
                if self._stopping and not self.scheduler.has_work():
                    return
            with lock:
                t1 = time.perf_counter()
                a["idle_s"] += t1 - self._idle_since
                self._idle_since = None
            events = self.scheduler.step()
            t2 = time.perf_counter()
            with lock:
                a["step_s"] += t2 - t1
                a["steps"] += 1
                a["tokens"] += sum(e.token_id is not None for e in events)  # before a consumer hears of them
            self._deliver(events)
            with lock:
                a["deliver_s"] += time.perf_counter() - t2

    def _deliver(self, events: list[TokenEvent]) -> None:
        """One call per sink per step, events in order: a server bridges a whole step in one hop.

        Sinks are grouped by equality, not identity: a server hands every request the bound method
        ``bridge.sink``, a new object each time it is read, and grouped by ``id`` a step of 32 rows
        became 32 calls, each waking the event loop with a write to its self-pipe."""
        groups: dict[EventSink, list[TokenEvent]] = {}
        for e in events:
            sink = self._sinks[e.request_id] if e.finish_reason is None else self._sinks.pop(e.request_id)
            groups.setdefault(sink, []).append(e)
        for sink, evs in groups.items():
            try:
                sink(evs)
            except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
                traceback.print_exc()
