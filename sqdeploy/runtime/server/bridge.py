"""The hop between the engine's worker thread and the server's event loop.

The engine hands over each step's events in one call; that becomes one
``call_soon_threadsafe`` onto the loop, which routes them to the asyncio queue of the
HTTP request that owns them. Handlers only ever ``await`` a queue, so inference never
blocks the loop, and leaving a :class:`Generation` for any reason (done, error,
timeout, client gone, shutdown) cancels whatever it still had running.

A streamed response notices a client that leaves through Starlette; a plain response
is silent until it is complete, so a :class:`Generation` given the request's
``receive`` watches it for the disconnect and stops generating at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

from sqdeploy.runtime.engine import Engine, GenerationRequest, InvalidRequestError, TokenEvent
from sqdeploy.runtime.server.limits import RequestError, ServeLimits, draining, overloaded, shut_down, timed_out, too_many_prompts
from sqdeploy.runtime.server.metrics import Metrics
from sqdeploy.runtime.server.stats import InferenceStats

_TIMEOUT, _GONE, _ABORT = object(), object(), object()


class ClientGone(Exception):
    """The client of a plain (non-streamed) response disconnected; its generation was cancelled."""


class Bridge:
    def __init__(self, engine: Engine, limits: ServeLimits, loop: asyncio.AbstractEventLoop):
        self.engine, self.limits, self.loop = engine, limits, loop
        self.queues: dict[int, asyncio.Queue] = {}
        self.inflight = 0
        self.draining = False
        self.open_generations: set[Generation] = set()
        self.aborted = 0  # sequences cut short by shutdown
        self.drain_timeout_s = 0.0
        self.metrics = Metrics(engine, lambda: self.inflight)
        self.stats = InferenceStats()

    def sink(self, events: list[TokenEvent]) -> None:
        """Called by the engine's thread once per step (events for a server that has stopped are dropped)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._dispatch, events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for e in events:
            q = self.queues.get(e.request_id)
            if q is not None:
                q.put_nowait(e)

    def open(self, requests: list[GenerationRequest], receive=None) -> Generation:
        """Admit and submit ``requests`` (400 if they can never fit, 429 beyond the free capacity, 503 while
        draining); close the result when done. ``receive``: the ASGI receive of a plain response, watched
        for the client leaving."""
        if self.draining:
            raise draining()
        if len(requests) > self.limits.capacity:
            raise too_many_prompts(self.limits, len(requests))
        if self.inflight + len(requests) > self.limits.capacity:
            raise overloaded(self.limits)
        return Generation(self, requests, receive)

    def abort(self, drain_timeout_s: float) -> int:
        """End every open generation with a 503 (the drain timeout expired); how many sequences were cut."""
        self.drain_timeout_s = drain_timeout_s
        cut = 0
        for g in list(self.open_generations):
            cut += len(g.pending)
            g.queue.put_nowait(_ABORT)
        self.aborted += cut
        return cut


class Generation:
    """Requests of one HTTP call: their events in order; :meth:`close` cancels leftovers and frees their slots."""

    def __init__(self, bridge: Bridge, requests: list[GenerationRequest], receive=None):
        self.bridge, self.requests = bridge, requests
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = {r.request_id for r in requests}
        self._last: dict[int, float] = {}
        self._succeeded = 0
        for r in requests:
            bridge.queues[r.request_id] = self.queue
        bridge.inflight += len(requests)
        bridge.open_generations.add(self)
        self._open = True
        self._timer = bridge.loop.call_later(bridge.limits.request_timeout_s, self.queue.put_nowait, _TIMEOUT)
        self._watcher = None if receive is None else bridge.loop.create_task(self._watch(receive))
        try:
            self.handles = bridge.engine.submit(requests, bridge.sink)
        except InvalidRequestError as exc:
            self.close()
            raise RequestError(503, str(exc), kind="server_shutting_down") from None
        bridge.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Idempotent: cancel what is still running and give the capacity back."""
        if not self._open:
            return
        self._open = False
        for h in getattr(self, "handles", []):
            if h.request_id in self.pending:
                h.cancel()
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        b = self.bridge
        now = time.perf_counter()
        for r in self.requests:
            b.queues.pop(r.request_id, None)
            if r.request_id in self.pending:  # cancelled: its own final event will not be routed here any more
                b.stats.failed(now - r.arrival)
                b.metrics.finished.labels("cancelled").inc()
        b.inflight -= len(self.requests)
        b.open_generations.discard(self)
        if self._succeeded:
            b.stats.executions += 1

    async def _watch(self, receive) -> None:
        """Wait for the client to leave (after the body, ``receive`` returns only ``http.disconnect``)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.queue.put_nowait(_GONE)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Events of all requests until each has finished; raises a 504 :class:`RequestError` at the timeout."""
        m = self.bridge.metrics
        while self.pending:
            e = await self.queue.get()
            if e is _TIMEOUT:
                raise timed_out(self.bridge.limits)
            if e is _ABORT:
                raise shut_down(self.bridge.drain_timeout_s)
            if e is _GONE:
                self.close()
                raise ClientGone()
            now = time.perf_counter()
            if e.token_id is not None:
                m.generation_tokens.inc()
                if e.request_id in self._last:
                    m.itl.observe(now - self._last[e.request_id])
                self._last[e.request_id] = now
            if e.finish_reason is not None:
                self.pending.discard(e.request_id)
                self._observe(e)
            yield e

    async def rendered(self, render, error) -> AsyncIterator[str]:
        """``render(event)`` of every event; the renders of events already queued when one is taken are
        joined into one string (one send for all of them: behind a burst of steps the event loop does one
        write per request instead of one per token, and holds the interpreter lock it shares with the
        engine's thread less). A :class:`RequestError` ends the stream with ``error(exc)``, after what was
        already rendered."""
        ready: list[str] = []
        try:
            async for e in self.events():
                ready.append(render(e))
                if self.queue.empty():
                    yield "".join(ready)
                    ready.clear()
        except RequestError as exc:
            ready.append(error(exc))
        if ready:
            yield "".join(ready)

    def _observe(self, e: TokenEvent) -> None:
        m, t = self.bridge.metrics, e.completion.timings
        m.finished.labels(e.finish_reason).inc()
        if e.finish_reason in ("stop", "length") and t.e2e is not None:
            self._succeeded += 1
            queued = None if t.scheduled is None else t.scheduled - t.arrival
            self.bridge.stats.succeeded(t.e2e, queued, None if t.scheduled is None else t.finished - t.scheduled)
        else:
            self.bridge.stats.failed(t.e2e or 0.0)
        for hist, value in (
            (m.ttft, t.ttft),
            (m.e2e, t.e2e),
            (m.queue_time, None if t.scheduled is None else t.scheduled - t.arrival),
        ):
            if value is not None:
                hist.observe(value)


class EventStream(StreamingResponse):
    """Server-sent events of a :class:`Generation`, which is closed however the response ends.

    Closing in the response (not in the generator) also covers a client that leaves
    before the first byte, when the generator never starts and its ``finally`` never runs.
    """

    def __init__(self, gen: Generation, content):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


def serving(request) -> bool:
    """Ready for generation: not draining, and the engine can still run a step (``healthy``, where it says)."""
    state = request.app.state
    return not state.bridge.draining and bool(getattr(state.engine, "healthy", True))
