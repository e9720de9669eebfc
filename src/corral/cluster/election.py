"""Leader election among servers on an etcd lease, and the fence every leader write carries.

The leader key is created with a compare on its absence and lives on the leader's lease. Its
create_revision is the term: every write a control loop makes carries
``Expect(LEADER, create_revision=term)``, so a deposed leader's writes fail even if it has not
noticed yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from corral.errors import Conflict, CorralError
from corral.model import LeaderRecord, utcnow
from corral.state import Expect, Put, Store, keys
from corral.state.codec import decode, encode

__all__ = ["LeaderElection", "read_leader"]

log = logging.getLogger(__name__)


async def read_leader(store: Store) -> tuple[LeaderRecord, int] | None:
    """The current leader and its term, or None when there is none."""
    kv = await store.get(keys.LEADER)
    if kv is None:
        return None
    return decode("leader", kv.value, LeaderRecord), kv.create_revision


class LeaderElection:
    """Campaigns until cancelled; runs ``lead(term)`` while this server holds the key.

    ``lead`` is cancelled the moment leadership is lost (lease not renewed in time).
    """

    def __init__(self, store: Store, node: str, address: str, *, ttl_s: int = 10) -> None:
        self.store = store
        self.node = node
        self.address = address
        self.ttl_s = ttl_s
        self.term = 0
        self._lease = 0

    @property
    def is_leader(self) -> bool:
        return self.term != 0

    def fence(self) -> Expect:
        if not self.term:
            raise Conflict("not the leader")
        return Expect(keys.LEADER, create_revision=self.term)

    async def _resume(self) -> bool:
        """Take back a term whose key still lives on our own lease (the store blinked)."""
        if not self._lease:
            return False
        kv = await self.store.get(keys.LEADER)
        if kv is None or kv.lease != self._lease:
            return False
        if await self.store.keepalive(self._lease) <= 0:
            return False
        self.term = kv.create_revision
        return True

    async def _try_acquire(self) -> bool:
        if await self._resume():
            return True
        if await self.store.get(keys.LEADER) is not None:
            return False  # someone leads: no lease to grant and revoke
        self._lease = await self.store.grant_lease(self.ttl_s)
        record = LeaderRecord(node=self.node, address=self.address, since=utcnow())
        try:
            rev = await self.store.commit(
                [Put(keys.LEADER, encode("leader", record), lease=self._lease)],
                [Expect.missing(keys.LEADER)],
            )
        except Conflict:
            await self.store.revoke_lease(self._lease)
            self._lease = 0
            return False
        self.term = rev
        return True

    async def _hold(self) -> None:
        """Return when leadership is lost."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            budget = max(renewed + self.ttl_s * 2 / 3 - loop.time(), 0.01)
            try:
                remaining = await asyncio.wait_for(self.store.keepalive(self._lease), budget)
            except (CorralError, TimeoutError) as exc:
                log.warning(
                    "leader lease renewal failed: %s",
                    str(exc)
                    or f"etcd did not answer within {budget:.1f} s (this host "
                    "overloaded, or cut off from the etcd members?)",
                )
                remaining = -1
            now = loop.time()
            if remaining > 0:
                renewed = now
                continue
            # Safe side: step down before the lease could have expired on the servers.
            if remaining == 0 or now - renewed >= self.ttl_s * 2 / 3:
                return

    async def run(self, lead: Callable[[int], Coroutine[Any, Any, None]]) -> None:
        while True:
            try:
                acquired = await self._try_acquire()
            except CorralError as exc:
                log.warning("election: store unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if not acquired:
                await asyncio.sleep(0.5)  # the leader key is gone within a TTL of its holder dying
                continue
            log.info("became leader (term %d)", self.term)
            leading: asyncio.Task[None] = asyncio.create_task(lead(self.term), name="leader-loops")
            holding = asyncio.create_task(self._hold(), name="leader-lease")
            loops_ended = False
            try:
                await asyncio.wait({leading, holding}, return_when=asyncio.FIRST_COMPLETED)
                loops_ended = leading.done()
            finally:
                for t in (leading, holding):
                    t.cancel()
                for t in (leading, holding):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                term, self.term = self.term, 0
                if term:
                    log.warning("stepped down as leader (term %d)", term)
                if loops_ended:
                    # The loops failed: let another server try. (If the lease merely could
                    # not be renewed, keep it: the term may be resumed when the store is back.)
                    with contextlib.suppress(CorralError):
                        await self.store.revoke_lease(self._lease)
                    self._lease = 0
            if loops_ended and not leading.cancelled() and leading.exception() is not None:
                log.error("leader loops failed", exc_info=leading.exception())
            await asyncio.sleep(0.5)

    async def resign(self) -> None:
        """Give up leadership at once (clean shutdown) by revoking the lease."""
        if self._lease:
            with contextlib.suppress(CorralError):
                await self.store.revoke_lease(self._lease)
        self.term = 0
