"""The state store and leader fencing against a real etcd member."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.cluster import EtcdConfig, EtcdSupervisor, LeaderElection
from corral.errors import Conflict, Unavailable
from corral.state import Delete, Expect, Put, Store, keys
from corral.state import store as store_module
from corral.state.store import Page
from tests.integration.harness import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdSupervisor]:
    sup = EtcdSupervisor(EtcdConfig("t", tmp_path, "127.0.0.1", free_port(), free_port()))
    await sup.start()
    yield sup
    await sup.stop()


@pytest.fixture
async def store(etcd: EtcdSupervisor) -> AsyncIterator[Store]:
    s = Store([etcd.config.client_url])
    yield s
    await s.close()


async def test_commit_is_all_or_nothing(store: Store) -> None:
    await store.commit([Put("/corral/v1/vms/a", b"1")])
    with pytest.raises(Conflict):
        await store.commit(
            [Put("/corral/v1/vms/b", b"2"), Delete("/corral/v1/vms/a")],
            [Expect.missing("/corral/v1/vms/a")],
        )
    assert await store.get("/corral/v1/vms/b") is None
    assert (await store.get("/corral/v1/vms/a")) is not None


async def test_list_pages_are_pinned_to_the_first_revision(store: Store) -> None:
    for i in range(5):
        await store.commit([Put(f"/corral/v1/vms/v{i}", b"x")])
    first = await store.list("/corral/v1/vms/", limit=2)
    await store.commit([Put("/corral/v1/vms/v9", b"late"), Delete("/corral/v1/vms/v4")])
    names = [kv.key for kv in first.items]
    cursor = first.next_cursor
    while cursor:
        page = await store.list("/corral/v1/vms/", limit=2, cursor=cursor)
        assert page.revision == first.revision
        names += [kv.key for kv in page.items]
        cursor = page.next_cursor
    assert names == [f"/corral/v1/vms/v{i}" for i in range(5)]


async def test_watch_resumes_exactly_after_a_revision(store: Store) -> None:
    rev = await store.commit([Put("/corral/v1/vms/a", b"1")])
    await store.commit([Put("/corral/v1/vms/b", b"2")])
    await store.commit([Delete("/corral/v1/vms/a")])
    seen = []
    async for event in store.watch("/corral/v1/vms/", rev):
        seen.append((event.type, event.kv.key))
        if len(seen) == 2:
            break
    assert seen == [("put", "/corral/v1/vms/b"), ("delete", "/corral/v1/vms/a")]


async def test_a_state_larger_than_a_grpc_message_lists_and_watches_whole(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3,000 VMs with their tasks and placement records came to 9.5 MB: more than gRPC's
    # default 4 MiB per message, which left a new leader re-listing forever. Here 6 MiB in
    # 12 records, listed in pages of 5 keys, and a watch catching up over all of them.
    monkeypatch.setattr(store_module, "LIST_PAGE_KEYS", 5)
    start = await store.revision()
    big = b"x" * (512 * 1024)
    for i in range(12):
        await store.commit([Put(f"/corral/v1/vms/v{i:02d}", big + bytes([i]))])
    items, revision = await store.list_all("/corral/v1/")
    assert [kv.key for kv in items] == [f"/corral/v1/vms/v{i:02d}" for i in range(12)]
    assert all(kv.value == big + bytes([i]) for i, kv in enumerate(items))
    assert revision == await store.revision()
    seen = []
    async for event in store.watch("/corral/v1/", start):
        seen.append(event.kv.key)
        if len(seen) == 12:
            break
    assert seen == [kv.key for kv in items]


async def test_listing_all_starts_over_when_its_revision_is_compacted(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LIST_PAGE_KEYS", 2)
    for i in range(5):
        await store.commit([Put(f"/corral/v1/vms/v{i}", b"old")])
    real_list = store.list
    compacted = False

    async def list_then_compact(prefix: str, **kw: Any) -> Page:
        nonlocal compacted
        page = await real_list(prefix, **kw)
        if not compacted:  # between the first and second page: rewrite all and compact
            compacted = True
            for i in range(5):
                await store.commit([Put(f"/corral/v1/vms/v{i}", b"new")])
            await (await store._connected()).compact(await store.revision(), physical=True)
        return page

    monkeypatch.setattr(store, "list", list_then_compact)
    items, revision = await store.list_all("/corral/v1/vms/")
    assert [kv.value for kv in items] == [b"new"] * 5
    assert revision == await store.revision()


async def test_a_deposed_leader_cannot_write(store: Store) -> None:
    a = LeaderElection(store, "a", "http://a", ttl_s=3)
    b = LeaderElection(store, "b", "http://b", ttl_s=3)
    assert await a._try_acquire()
    assert not await b._try_acquire()
    fence_a = a.fence()
    await store.commit([Put("/corral/v1/vms/x", b"from a")], [fence_a])
    # a's lease lapses (a partition, a pause); b takes over with a new term.
    await store.revoke_lease(a._lease)
    assert await b._try_acquire()
    assert b.term > a.term
    with pytest.raises(Conflict):
        await store.commit([Put("/corral/v1/vms/x", b"stale write from a")], [fence_a])
    await store.commit([Put("/corral/v1/vms/x", b"from b")], [b.fence()])
    kv = await store.get("/corral/v1/vms/x")
    assert kv is not None and kv.value == b"from b"
    leader = await store.get(keys.LEADER)
    assert leader is not None and b'"node":"b"' in leader.value


async def test_leader_loops_stop_when_leadership_is_lost(store: Store) -> None:
    election = LeaderElection(store, "a", "http://a", ttl_s=2)
    started = asyncio.Event()
    stopped = asyncio.Event()

    async def lead(term: int) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    runner = asyncio.create_task(election.run(lead))
    await asyncio.wait_for(started.wait(), 10)
    await store.commit([Delete(keys.LEADER)])  # e.g. an operator or a lease lost in etcd
    await store.revoke_lease(election._lease)
    await asyncio.wait_for(stopped.wait(), 10)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_unreachable_etcd_is_unavailable(etcd: EtcdSupervisor) -> None:
    dead = Store([f"http://127.0.0.1:{free_port()}"], timeout_s=1)
    with pytest.raises(Unavailable):
        await dead.get("/corral/v1/cluster")
    await dead.close()
