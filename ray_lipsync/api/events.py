"""Server-sent events of one session: utterance.start / utterance.end / session.closed.

`EventHub` fans events out to any number of subscribers (each an EventSource connection);
`format_sse` turns one event into the text/event-stream wire format.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

logger = logging.getLogger(__name__)

_CLOSED = object()


class EventHub:
    """Publish/subscribe for one session's events. Slow subscribers lose the oldest events."""

    def __init__(self, max_queued: int = 256) -> None:
        self._subscribers: set[asyncio.Queue] = set()
        self._max_queued = max_queued
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def queued(self) -> int:
        """Events waiting in subscriber queues (a queue-depth metric)."""
        return sum(q.qsize() for q in self._subscribers)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        if self._closed:
            return
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                logger.warning("event subscriber too slow; dropped its oldest event")
            queue.put_nowait((event, data))

    def close(self, final: tuple[str, dict[str, Any]] | None = None) -> None:
        """Send `final` (if any) and end every subscription."""
        if self._closed:
            return
        if final is not None:
            self.publish(*final)
        self._closed = True
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(_CLOSED)

    async def subscribe(self, keepalive_s: float = 15.0) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events until the hub closes; ("ping", {}) after `keepalive_s` of silence."""
        queue: asyncio.Queue = asyncio.Queue(self._max_queued)
        if self._closed:
            return
        self._subscribers.add(queue)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), keepalive_s)
                except asyncio.TimeoutError:
                    yield "ping", {}
                    continue
                if item is _CLOSED:
                    return
                yield item
        finally:
            self._subscribers.discard(queue)


def format_sse(event: str, data: dict[str, Any]) -> str:
    """One event in text/event-stream format (a comment line for keep-alive pings)."""
    if event == "ping":
        return ": ping\n\n"
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
