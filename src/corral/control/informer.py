"""A local copy of everything under a prefix: list once, then follow the watch.

Loops read this cache (never an event payload) and are told which keys changed. After a loop
commits, it ``apply``s what it wrote at once, so its next decision sees its own writes even
before the watch event arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from corral.errors import CorralError
from corral.state import KV, Compacted, Store

__all__ = ["Informer"]

log = logging.getLogger(__name__)


class Informer:
    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.revision = 0
        self._items: dict[str, KV] = {}
        self._listeners: list[Callable[[str], None]] = []
        self.synced = asyncio.Event()

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def get(self, key: str) -> KV | None:
        return self._items.get(key)

    def under(self, prefix: str) -> Iterator[KV]:
        for key, kv in list(self._items.items()):
            if key.startswith(prefix):
                yield kv

    def apply(self, kv: KV) -> None:
        """Record a value this process just wrote (ignored if the cache already has newer)."""
        current = self._items.get(kv.key)
        if current is None or current.mod_revision <= kv.mod_revision:
            self._items[kv.key] = kv

    def apply_delete(self, key: str) -> None:
        self._items.pop(key, None)

    def _notify(self, key: str) -> None:
        for listener in self._listeners:
            listener(key)

    async def _relist(self) -> None:
        items, revision = await self.store.list_all(self.prefix)
        old = self._items
        self._items = {kv.key: kv for kv in items}
        self.revision = revision
        for key in set(old) | set(self._items):
            self._notify(key)
        self.synced.set()

    async def run(self) -> None:
        """List and watch until cancelled; re-list after compaction or store failure."""
        while True:
            try:
                await self._relist()
                async for event in self.store.watch(self.prefix, self.revision):
                    kv = event.kv
                    self.revision = max(self.revision, kv.mod_revision)
                    if event.type == "delete":
                        self._items.pop(kv.key, None)
                    else:
                        self.apply(kv)
                    self._notify(kv.key)
            except Compacted:
                log.info("watch of %s compacted; re-listing", self.prefix)
            except CorralError as exc:
                log.warning("watch of %s failed (%s); re-listing in 1s", self.prefix, exc)
                await asyncio.sleep(1.0)
