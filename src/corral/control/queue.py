"""A level-triggered work queue: keys, deduplicated, one reconcile at a time per queue."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral.errors import Conflict, CorralError

__all__ = ["Outcome", "WorkQueue"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a reconcile decided: a sentence for the log, and when to look again (or never)."""

    message: str = ""
    requeue_after: float | None = None


class WorkQueue:
    def __init__(self, name: str, reconcile: Callable[[str], Awaitable[Outcome]]) -> None:
        self.name = name
        self._reconcile = reconcile
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.last_messages: dict[str, str] = {}

    def add(self, key: str) -> None:
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)

    def add_after(self, key: str, delay_s: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay_s, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def run(self) -> None:
        failures: dict[str, int] = {}
        try:
            while True:
                key = await self._queue.get()
                self._queued.discard(key)
                try:
                    outcome = await self._reconcile(key)
                except Conflict as exc:
                    # Someone changed the object (or leadership moved): look again soon.
                    log.info("%s %s: %s; retrying", self.name, key, exc)
                    self.add_after(key, 0.05)
                    continue
                except CorralError as exc:
                    n = failures[key] = failures.get(key, 0) + 1
                    log.warning("%s %s failed (%s); retry %d", self.name, key, exc, n)
                    self.add_after(key, min(0.2 * 2**n, 10.0))
                    continue
                failures.pop(key, None)
                if outcome.message and self.last_messages.get(key) != outcome.message:
                    self.last_messages[key] = outcome.message
                    log.info("%s", outcome.message)
                if outcome.requeue_after is not None:
                    self.add_after(key, outcome.requeue_after)
        finally:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
