"""Group commit: concurrent transactions share one etcd transaction when their keys allow
(and concurrent single-key reads share one read, :class:`ReadBatcher`).

Each etcd transaction costs a raft entry, a WAL fsync, a gRPC round trip and the client's
per-call overhead, whatever it holds; under a stream of creates, status reports and task
updates those fixed costs dominate. While a transaction is in flight the ones that arrive
queue up; the next send merges the queued transactions into one, in queue order, leaving out
(for a later send) any that compares or writes a key an earlier member writes. A merged
transaction is then equivalent to running its members one after the other in queue order:
etcd evaluates every compare before any write, and no member reads or writes what an earlier
one wrote. When the merged transaction's compares fail, each member is sent alone, so each
caller gets its own answer (its revision or its Conflict) exactly as without batching.

etcd batches raft proposals the same way on its side; this is the client's half. Written by
hand: aetcd has no such layer and no library adds one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from corral.errors import Conflict

__all__ = ["CommitBatcher", "ReadBatcher"]

# etcd refuses more than --max-txn-ops (128 by default) operations or compares per
# transaction, and requests above --max-request-bytes (1.5 MiB by default).
MAX_OPS = 128
MAX_BYTES = 1024 * 1024


class Keyed(Protocol):
    """An operation or a compare: a put or delete (a put has ``value``), or an expect."""

    @property
    def key(self) -> str: ...


@dataclass(eq=False)
class _Entry:
    ops: Sequence[Keyed]
    expect: Sequence[Keyed]
    writes: frozenset[str]
    compares: frozenset[str]
    size: int
    future: asyncio.Future[int] = field(repr=False)


Send = Callable[[Sequence[Keyed], Sequence[Keyed]], Awaitable[int]]


class CommitBatcher:
    """Queues transactions and sends them merged, ``in_flight`` sends at a time.

    ``send(ops, expect)`` commits one transaction (raising Conflict when a compare fails);
    ops and expects need ``key`` attributes, and ops a ``value`` when they are puts.
    """

    def __init__(self, send: Send, *, in_flight: int = 1) -> None:
        self._send = send
        self._in_flight = in_flight
        self._queue: list[_Entry] = []
        self._senders: set[asyncio.Task[None]] = set()

    async def commit(self, ops: Sequence[Keyed], expect: Sequence[Keyed]) -> int:
        loop = asyncio.get_running_loop()
        entry = _Entry(
            ops,
            expect,
            frozenset(o.key for o in ops),
            frozenset(e.key for e in expect),
            sum(len(o.key) + len(getattr(o, "value", b"")) + 16 for o in ops),
            loop.create_future(),
        )
        if len(entry.writes) != len(ops) or len(ops) >= MAX_OPS // 2:
            # etcd refuses a transaction writing one key twice: it is sent alone to say so.
            # A large one (a placement pass's chunk) gains nothing from company and would
            # wait behind the transaction in flight: it goes at once, on its own.
            return await self._send(ops, expect)
        self._queue.append(entry)
        # Senders of a loop that is gone (tests run one loop after another) count for nothing.
        self._senders = {t for t in self._senders if t.get_loop() is loop and not t.done()}
        if len(self._senders) < self._in_flight:
            self._senders.add(loop.create_task(self._drain(), name="etcd-commit"))
        return await entry.future

    def _take(self) -> list[_Entry]:
        """The next batch: queued entries, in order, whose keys keep them independent."""
        batch: list[_Entry] = []
        writes: set[str] = set()
        touched: set[str] = set()  # keys of entries left behind: later ones keep their order
        compares: set[Keyed] = set()
        ops = size = 0
        rest: list[_Entry] = []
        loop = asyncio.get_running_loop()
        for e in self._queue:
            if e.future.done() or e.future.get_loop() is not loop:
                continue  # its caller was cancelled before it was sent (or its loop is gone)
            keys = e.writes | e.compares
            new_compares = compares.union(e.expect)
            fits = not batch or (
                ops + len(e.ops) <= MAX_OPS
                and len(new_compares) <= MAX_OPS
                and size + e.size <= MAX_BYTES
            )
            if fits and not (keys & writes) and not (keys & touched):
                batch.append(e)
                writes |= e.writes
                compares = new_compares
                ops += len(e.ops)
                size += e.size
            else:
                rest.append(e)
                touched |= keys
        self._queue = rest
        return batch

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            if not batch:
                continue  # every queued caller had given up
            try:
                await self._run(batch)
            except BaseException:
                for e in batch:
                    e.future.cancel()
                raise

    async def _run(self, batch: list[_Entry]) -> None:
        if len(batch) == 1:
            await self._one(batch[0])
            return
        ops = [o for e in batch for o in e.ops]
        expect = list(dict.fromkeys(x for e in batch for x in e.expect))
        try:
            rev = await self._send(ops, expect)
        except Conflict:
            # Somebody's compare failed: each commit alone finds out whose.
            await asyncio.gather(*(self._one(e) for e in batch))
            return
        except Exception as exc:
            for e in batch:
                _settle(e.future, exc=exc)
            return
        for e in batch:
            _settle(e.future, rev)

    async def _one(self, e: _Entry) -> None:
        try:
            rev = await self._send(e.ops, e.expect)
        except Exception as exc:
            _settle(e.future, exc=exc)
            return
        _settle(e.future, rev)


def _settle(
    future: asyncio.Future[int], rev: int | None = None, *, exc: BaseException | None = None
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert rev is not None
        future.set_result(rev)


ReadMany = Callable[[Sequence[str], bool], Awaitable[dict[str, object]]]


class ReadBatcher:
    """Single-key reads that arrive while a read is in flight are sent together as one
    transaction of ranges (one round trip and one gRPC call instead of one each).

    ``read(keys, serializable)`` returns the found keys' values; linearizable and
    serializable reads are never mixed (etcd serves a transaction locally only when every
    range in it is serializable).
    """

    def __init__(self, read: ReadMany) -> None:
        self._read = read
        self._queues: dict[bool, list[tuple[str, asyncio.Future[object]]]] = {
            False: [],
            True: [],
        }
        self._senders: dict[bool, asyncio.Task[None] | None] = {False: None, True: None}

    async def get(self, key: str, serializable: bool) -> object:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self._queues[serializable].append((key, future))
        sender = self._senders[serializable]
        if sender is None or sender.done() or sender.get_loop() is not loop:
            self._senders[serializable] = loop.create_task(
                self._drain(serializable), name="etcd-read"
            )
        return await future

    async def _drain(self, serializable: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            queue = [
                (k, f)
                for k, f in self._queues[serializable]
                if not f.done() and f.get_loop() is loop
            ]
            if not queue:
                self._queues[serializable] = []
                return
            batch, self._queues[serializable] = queue[:MAX_OPS], queue[MAX_OPS:]
            keys = list(dict.fromkeys(k for k, _ in batch))
            try:
                found = await self._read(keys, serializable)
            except Exception as exc:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            except BaseException:
                for _, f in batch:
                    f.cancel()
                raise
            for k, f in batch:
                if not f.done():
                    f.set_result(found.get(k))
