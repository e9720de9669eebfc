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
        # Keys grouped by their first segment after the prefix ("vms", "tasks", ...), so a loop
        # scanning one kind does not walk every task and idempotency record.
        self._buckets: dict[str, dict[str, KV]] = {}
        self._listeners: list[Callable[[str], None]] = []
        self.synced = asyncio.Event()

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _bucket(self, key: str) -> dict[str, KV]:
        name = key[len(self.prefix) :].split("/", 1)[0]
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = {}
        return bucket

    def get(self, key: str) -> KV | None:
        return self._bucket(key).get(key)

    def under(self, prefix: str) -> Iterator[KV]:
        whole = prefix == self.prefix
        buckets = list(self._buckets.values()) if whole else [self._bucket(prefix)]
        for bucket in buckets:
            for key, kv in list(bucket.items()):
                if key.startswith(prefix):
                    yield kv

    def keys(self) -> list[str]:
        return [key for bucket in self._buckets.values() for key in bucket]

    def apply(self, kv: KV) -> None:
        """Record a value this process just wrote (ignored if the cache already has newer)."""
        bucket = self._bucket(kv.key)
        current = bucket.get(kv.key)
        if current is None or current.mod_revision <= kv.mod_revision:
            bucket[kv.key] = kv

    def apply_delete(self, key: str) -> None:
        self._bucket(key).pop(key, None)

    def _notify(self, key: str) -> None:
        for listener in self._listeners:
            listener(key)

    async def _relist(self) -> None:
        items, revision = await self.store.list_all(self.prefix)
        old = set(self.keys())
        self._buckets = {}
        for kv in items:
            self._bucket(kv.key)[kv.key] = kv
        self.revision = revision
        for key in old | set(self.keys()):
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
                        self.apply_delete(kv.key)
                    else:
                        self.apply(kv)
                    self._notify(kv.key)
            except Compacted:
                log.info("watch of %s compacted; re-listing", self.prefix)
            except CorralError as exc:
                log.warning("watch of %s failed (%s); re-listing in 1s", self.prefix, exc)
                await asyncio.sleep(1.0)
