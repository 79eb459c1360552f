"""Server-sent events: chunks of events already queued go out in one send, the same bytes as one by one."""

from __future__ import annotations

import asyncio

from sqdeploy.runtime.engine import TokenEvent
from sqdeploy.runtime.server import openai
from sqdeploy.runtime.server.bridge import Generation
from sqdeploy.runtime.server.limits import RequestError


class _Request:
    request_id = 7


class _Gen:
    """What ``_sse`` reads of a Generation: its requests, its queue and ``events()`` over that queue."""

    def __init__(self, items):
        self.requests = [_Request()]
        self.queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            self.queue.put_nowait(item)

    rendered = Generation.rendered  # the coalescing under test, over this queue

    async def events(self):
        while True:
            e = await self.queue.get()
            if isinstance(e, RequestError):
                raise e
            yield e
            if e.finish_reason is not None:
                return


def _sends(items) -> list[str]:
    async def run():
        return [s async for s in openai._sse(_Gen(items), {"id": "x"}, [], include_usage=False)]

    return asyncio.run(run())


def test_queued_events_go_out_in_one_send_with_the_same_bytes():
    events = [TokenEvent(7, i, f"t{i}", i) for i in range(5)] + [TokenEvent(7, 5, "", 5, finish_reason="length")]
    sends = _sends(events)
    one_by_one = "".join(openai._chunk({"id": "x"}, [{"index": 0, "text": e.text, "logprobs": None,
                                                      "finish_reason": e.finish_reason}]) for e in events)
    assert sends[0] == one_by_one and sends[-1] == "data: [DONE]\n\n" and len(sends) == 2


def test_an_error_after_queued_events_keeps_them_before_it():
    events = [TokenEvent(7, 1, "a", 0), TokenEvent(7, 2, "b", 1), RequestError(504, "too slow", kind="timeout")]
    body = "".join(_sends(events))
    assert body.index('"text": "a"') < body.index('"text": "b"') < body.index("too slow") < body.index("[DONE]")
