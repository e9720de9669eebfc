"""Gossip membership with the real ``serf`` binary: three agents on 127.0.0.1, .2 and .3.

Times are printed (``pytest -s``) for the record; the bounds asserted here are loose on
purpose, timing goals live in ``bench/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral.cluster.serf import SerfAgent, generate_key
from corral.cluster.serf_rpc import MemberEvent, SerfClient, SerfError
from tests.integration.harness import free_port

pytestmark = pytest.mark.integration

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


@dataclass
class Node:
    agent: SerfAgent
    client: SerfClient

    @property
    def name(self) -> str:
        return self.agent.node


class Nodes:
    """Builds agents and clients that are all stopped at teardown, even when a test fails."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = generate_key()
        self.agents: list[SerfAgent] = []
        self.clients: list[SerfClient] = []

    async def start(self, name: str, host: str, *, key: str | None = None, **kw: Any) -> Node:
        kw.setdefault("tags", {"role": "server" if name == "n1" else "compute", "name": name})
        agent = SerfAgent(
            name,
            host,
            free_port(host),
            free_port("127.0.0.1"),
            self.root / name,
            encrypt_key=key or self.key,
            **kw,
        )
        self.agents.append(agent)
        await agent.start()
        return Node(agent, await self.connect(agent))

    async def connect(self, agent: SerfAgent) -> SerfClient:
        client = await agent.connect()
        self.clients.append(client)
        return client

    async def trio(self, *, joined: bool, restart: bool = True) -> list[Node]:
        nodes = [
            await self.start(f"n{i + 1}", host, restart=restart) for i, host in enumerate(HOSTS)
        ]
        if joined:
            await nodes[1].client.join([nodes[0].agent.gossip_address])
            await nodes[2].client.join([nodes[1].agent.gossip_address])
            await wait_until(lambda: _all_alive(nodes), 10.0, "the cluster to converge")
        return nodes

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for agent in self.agents:
            try:
                await agent.stop(timeout_s=5.0)
            except BaseException:
                if agent.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(agent.pid, signal.SIGKILL)
                raise


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    made = Nodes(tmp_path)
    try:
        yield made
    finally:
        await made.close()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll ``check`` until it holds; return the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)
    return loop.time() - start


async def statuses(client: SerfClient) -> dict[str, str]:
    return {m.name: m.status for m in await client.members()}


async def _all_alive(nodes: list[Node]) -> bool:
    want = {n.name: "alive" for n in nodes}
    return all([await statuses(n.client) == want for n in nodes])


async def _seen_as(observers: list[Node], name: str, status: str) -> bool:
    return all([(await statuses(n.client)).get(name) == status for n in observers])


async def test_three_agents_form_a_cluster_through_any_member(nodes: Nodes) -> None:
    n1, n2, n3 = await nodes.trio(joined=False)
    assert await n2.client.join([n1.agent.gossip_address]) == 1
    assert await n3.client.join([n2.agent.gossip_address]) == 1  # through n2, not the first
    took = await wait_until(lambda: _all_alive([n1, n2, n3]), 10.0, "all three alive everywhere")
    print(f"\njoin converged on all three members in {took:.2f}s")

    expected = {n.name: (n.agent.bind_addr, n.agent.bind_port, n.agent.tags) for n in (n1, n2, n3)}
    for observer in (n1, n2, n3):
        members = await observer.client.members()
        assert {m.name: (m.addr, m.port, dict(m.tags)) for m in members} == expected
    computes = await n1.client.members_filtered(tags={"role": "compute"}, status="alive")
    assert sorted(m.name for m in computes) == ["n2", "n3"]


async def test_a_member_join_stream_sees_joins_while_calls_share_its_connection(
    nodes: Nodes,
) -> None:
    n1, n2, n3 = await nodes.trio(joined=False)
    loop = asyncio.get_running_loop()
    async with n1.client.stream("member-join") as events:
        start = loop.time()
        await n2.client.join([n1.agent.gossip_address])
        await n3.client.join([n1.agent.gossip_address])
        # Several requests in flight on the connection that carries the open stream.
        members, _, alive = await asyncio.gather(
            n1.client.members(), n1.client.stats(), n1.client.members_filtered(status="alive")
        )
        assert len(members) == len(alive) == 3
        joined: set[str] = set()
        async with asyncio.timeout(10.0):
            async for event in events:
                assert isinstance(event, MemberEvent) and event.kind == "member-join"
                joined |= {m.name for m in event.members}
                if {"n2", "n3"} <= joined:
                    break
    print(f"\nmember-join events for both joiners arrived after {loop.time() - start:.2f}s")


async def test_a_tag_update_spreads_to_the_others(nodes: Nodes) -> None:
    n1, n2, n3 = await nodes.trio(joined=True)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await n2.client.tags(set={"zone": "b"}, delete=["role"])

    async def spread() -> bool:
        for observer in (n1, n3):
            members = {m.name: dict(m.tags) for m in await observer.client.members()}
            if members["n2"] != {"name": "n2", "zone": "b"}:
                return False
        return True

    await wait_until(spread, 10.0, "n2's new tags on n1 and n3")
    print(f"\ntag update seen by both peers {loop.time() - start:.3f}s after the call")
    assert (await n2.client.stats())["tags"] == {"name": "n2", "zone": "b"}


async def test_a_killed_member_is_marked_failed_by_the_others(nodes: Nodes) -> None:
    n1, n2, n3 = await nodes.trio(joined=True, restart=False)
    async with n1.client.stream("member-failed") as failures:
        assert n3.agent.pid is not None
        os.kill(n3.agent.pid, signal.SIGKILL)
        took = await wait_until(lambda: _seen_as([n1, n2], "n3", "failed"), 30.0, "n3 failed")
        print(f"\nSIGKILLed member marked failed by both peers after {took:.2f}s")
        async with asyncio.timeout(10.0):
            event = await anext(failures)
    assert isinstance(event, MemberEvent) and event.kind == "member-failed"
    assert [m.name for m in event.members] == ["n3"]
    await wait_until(lambda: _not(n3.agent.healthy), 5.0, "n3's supervisor to notice")
    assert n3.agent.restarts == 0


async def _not(value: bool) -> bool:
    return not value


async def test_a_graceful_leave_shows_left_and_drops_its_own_connections(nodes: Nodes) -> None:
    n1, n2, n3 = await nodes.trio(joined=True)
    loop = asyncio.get_running_loop()
    async with n3.client.stream() as own_events:
        start = loop.time()
        await n3.agent.stop(leave=True)
        left_after = loop.time() - start
        took = await wait_until(lambda: _seen_as([n1, n2], "n3", "left"), 10.0, "n3 left")
        print(f"\ngraceful leave took {left_after:.2f}s; peers saw 'left' {took:.2f}s later")
        with pytest.raises(SerfError, match="connection"):
            async with asyncio.timeout(5.0):
                async for _ in own_events:
                    pass
    with pytest.raises(SerfError):
        await n3.client.members()


async def test_an_agent_with_another_gossip_key_cannot_join(nodes: Nodes) -> None:
    n1 = await nodes.start("n1", HOSTS[0])
    intruder = await nodes.start("intruder", HOSTS[1], key=generate_key())
    with pytest.raises(SerfError, match="decrypt"):
        await intruder.client.join([n1.agent.gossip_address])
    await asyncio.sleep(1.0)
    assert await statuses(n1.client) == {"n1": "alive"}
    assert await statuses(intruder.client) == {"intruder": "alive"}


async def test_a_killed_serf_is_restarted_and_rejoins_with_its_tags(nodes: Nodes) -> None:
    n1, n2, n3 = await nodes.trio(joined=True)
    await n2.client.tags(set={"zone": "b"})
    old_pid = n2.agent.pid
    assert old_pid is not None
    await asyncio.sleep(2.5)  # serf's snapshot and the supervisor's probe record the peers
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        return n2.agent.restarts == 1 and n2.agent.healthy

    took = await wait_until(restarted, 15.0, "the supervisor to restart n2's serf")
    assert n2.agent.pid != old_pid
    with pytest.raises(SerfError):
        await n2.client.members()  # the old connection went down with the old process
    fresh = Node(n2.agent, await nodes.connect(n2.agent))
    rejoined = await wait_until(lambda: _all_alive([n1, fresh, n3]), 15.0, "n2 to rejoin")
    print(f"\nkilled serf restarted in {took:.2f}s and rejoined {rejoined:.2f}s later")
    tags_on_n1 = {m.name: dict(m.tags) for m in await n1.client.members()}["n2"]
    assert tags_on_n1 == {"role": "compute", "name": "n2", "zone": "b"}


async def test_peers_given_at_start_are_joined_without_a_call(nodes: Nodes) -> None:
    n1 = await nodes.start("n1", HOSTS[0])
    n2 = await nodes.start("n2", HOSTS[1], join=[n1.agent.gossip_address])
    await wait_until(lambda: _all_alive([n1, n2]), 10.0, "n2 to join n1 by itself")


async def test_the_gossip_key_stays_out_of_argv_and_rpc_listens_on_loopback_only(
    nodes: Nodes,
) -> None:
    n2 = await nodes.start("n2", HOSTS[1])
    assert n2.agent.pid is not None
    cmdline = await asyncio.to_thread(Path(f"/proc/{n2.agent.pid}/cmdline").read_bytes)
    argv = cmdline.split(b"\0")
    assert nodes.key.encode() not in argv
    assert b"127.0.0.1:%d" % n2.agent.rpc_port in argv
    config = n2.agent.data_dir / "serf.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    with pytest.raises(SerfError, match="cannot reach"):
        await SerfClient.connect(f"{HOSTS[1]}:{n2.agent.rpc_port}", timeout_s=2.0)
    assert (await n2.client.stats())["serf"]["encrypted"] == "true"
