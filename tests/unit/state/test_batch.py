"""Group commit: concurrent commits share transactions without changing anyone's answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from corral.errors import Conflict, Unavailable
from corral.state.batch import MAX_OPS, CommitBatcher, ReadBatcher
from corral.state.store import Delete, Expect, Put


class Kv:
    """A tiny transactional store with etcd's rules: compares first, then writes; one
    transaction = one revision; a key written twice in one transaction is refused."""

    def __init__(self) -> None:
        self.rev = 1
        self.mod: dict[str, int] = {}
        self.txns: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def send(self, ops: Sequence[Put | Delete], expect: Sequence[Expect]) -> int:
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        keys = [o.key for o in ops]
        assert len(set(keys)) == len(keys), "duplicate key given in txn request"
        assert len(ops) <= MAX_OPS and len(set(expect)) <= MAX_OPS
        for e in expect:
            if e.create_revision is not None:
                continue
            if self.mod.get(e.key, 0) != (e.mod_revision or 0):
                raise Conflict(f"{e.key} changed")
        self.rev += 1
        for o in ops:
            if isinstance(o, Put):
                self.mod[o.key] = self.rev
            else:
                self.mod.pop(o.key, None)
        self.txns.append(keys)
        return self.rev


async def _burst(kv: Kv, b: CommitBatcher, calls: list[tuple[list[Put], list[Expect]]]) -> list:
    """Start every call while the first transaction is held, then let them all go."""
    kv.gate = asyncio.Event()
    tasks = [asyncio.create_task(b.commit(*calls[0]))]
    await asyncio.sleep(0.01)  # the first is in flight
    tasks += [asyncio.create_task(b.commit(ops, ex)) for ops, ex in calls[1:]]
    await asyncio.sleep(0.01)
    kv.gate.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_independent_commits_queued_behind_one_in_flight_share_one_transaction() -> None:
    kv = Kv()
    b = CommitBatcher(kv.send)
    calls = [([Put(f"/k/{i}", b"v")], [Expect(f"/k/{i}", mod_revision=0)]) for i in range(10)]
    revs = await _burst(kv, b, calls)
    assert len(kv.txns) == 2  # the first alone, the nine that queued behind it together
    assert revs[0] == 2 and revs[1:] == [3] * 9
    assert all(kv.mod[f"/k/{i}"] for i in range(10))


async def test_a_failing_compare_fails_only_its_own_commit() -> None:
    kv = Kv()
    kv.mod["/k/taken"] = 1
    b = CommitBatcher(kv.send)
    calls = [
        ([Put("/k/first", b"v")], []),
        ([Put("/k/a", b"v")], [Expect("/k/a", mod_revision=0)]),
        ([Put("/k/taken", b"v")], [Expect("/k/taken", mod_revision=0)]),  # exists: conflict
        ([Put("/k/b", b"v")], [Expect("/k/b", mod_revision=0)]),
    ]
    out = await _burst(kv, b, calls)
    assert isinstance(out[2], Conflict)
    assert all(isinstance(r, int) for i, r in enumerate(out) if i != 2)
    assert "/k/a" in kv.mod and "/k/b" in kv.mod and kv.mod["/k/taken"] == 1


async def test_commits_on_the_same_key_run_one_after_the_other_in_order() -> None:
    kv = Kv()
    b = CommitBatcher(kv.send)
    # Two read-modify-writes of one key from the same revision: exactly one may win, as
    # without batching; merging them would let both compares pass.
    calls = [
        ([Put("/k/x", b"0")], []),
        ([Put("/k/y", b"1")], [Expect("/k/y", mod_revision=0)]),
        ([Put("/k/y", b"2")], [Expect("/k/y", mod_revision=0)]),
        ([Put("/k/z", b"3")], [Expect("/k/y", mod_revision=0)]),  # reads what #1 writes
    ]
    out = await _burst(kv, b, calls)
    assert isinstance(out[1], int)
    assert isinstance(out[2], Conflict) and isinstance(out[3], Conflict)
    assert "/k/z" not in kv.mod


async def test_a_batch_never_exceeds_etcds_operation_limit() -> None:
    kv = Kv()
    b = CommitBatcher(kv.send)
    calls = [([Put(f"/k/{i}/a", b"v"), Put(f"/k/{i}/b", b"v")], []) for i in range(200)]
    out = await _burst(kv, b, calls)
    assert all(isinstance(r, int) for r in out)
    assert max(len(t) for t in kv.txns) <= MAX_OPS
    assert len(kv.txns) < 10


async def test_an_etcd_error_reaches_every_caller_of_the_batch() -> None:
    gate = asyncio.Event()
    calls = 0

    async def send(ops: object, expect: object) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
            return 2
        raise Unavailable("etcd at 127.0.0.1:2379 unavailable")

    b = CommitBatcher(send)  # type: ignore[arg-type]
    first = asyncio.create_task(b.commit([Put("/k/0", b"v")], []))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(b.commit([Put(f"/k/{i}", b"v")], [])) for i in (1, 2)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == 2
    for t in rest:
        with pytest.raises(Unavailable):
            await t
    assert calls == 2  # the two queued commits were one transaction


async def test_a_cancelled_caller_is_not_sent() -> None:
    kv = Kv()
    b = CommitBatcher(kv.send)
    kv.gate = asyncio.Event()
    first = asyncio.create_task(b.commit([Put("/k/0", b"v")], []))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(b.commit([Put("/k/gone", b"v")], []))
    kept = asyncio.create_task(b.commit([Put("/k/kept", b"v")], []))
    await asyncio.sleep(0.01)
    gone.cancel()
    kv.gate.set()
    await first
    await kept
    assert "/k/gone" not in kv.mod and "/k/kept" in kv.mod


async def test_concurrent_reads_share_one_round_trip_and_keep_their_kind() -> None:
    calls: list[tuple[list[str], bool]] = []
    gate = asyncio.Event()

    async def read(keys: list[str], serializable: bool) -> dict[str, object]:
        calls.append((list(keys), serializable))
        await gate.wait()
        return {k: f"v:{k}" for k in keys if k != "/k/missing"}

    b = ReadBatcher(read)  # type: ignore[arg-type]
    first = asyncio.create_task(b.get("/k/0", False))
    await asyncio.sleep(0.01)  # in flight
    rest = [asyncio.create_task(b.get(k, False)) for k in ("/k/1", "/k/2", "/k/missing", "/k/1")]
    local = asyncio.create_task(b.get("/k/3", True))
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == "v:/k/0"
    assert [await t for t in rest] == ["v:/k/1", "v:/k/2", None, "v:/k/1"]
    assert await local == "v:/k/3"
    # One read for the first, one for the four queued behind it (a key asked twice is read
    # once), and the serializable read on its own.
    assert sorted(calls, key=str) == sorted(
        [(["/k/0"], False), (["/k/1", "/k/2", "/k/missing"], False), (["/k/3"], True)], key=str
    )


async def test_a_failed_read_reaches_every_caller_that_shared_it() -> None:
    async def read(keys: list[str], serializable: bool) -> dict[str, object]:
        await asyncio.sleep(0)
        raise Unavailable("etcd at 127.0.0.1:2379 unavailable")

    b = ReadBatcher(read)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(b.get(f"/k/{i}", False)) for i in range(3)]
    for t in tasks:
        with pytest.raises(Unavailable):
            await t
