"""The NodeService over gRPC end to end: a real etcd, two servers, one remote agent client.

Each server is what a server host runs: its own Store and LocalNodeService behind
``start_grpc_server``; the client is what a compute-only host runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import pytest

from corral.agent.drivers.fake import FakeDriver
from corral.agent.remote import RemoteNodeService
from corral.agent.runner import NodeAgent
from corral.api.grpc import start_grpc_server
from corral.cluster import EtcdConfig, EtcdSupervisor
from corral.errors import Unavailable, ValidationFailed
from corral.model import Assignment, Inventory, Node, Vm, VmObservation
from corral.service.context import RequestMeta, ServiceContext
from corral.service.node_api import LocalNodeService
from corral.service.vms import VmService
from corral.state import Objects, Put, Store, keys
from corral.state.codec import encode
from tests.integration.harness import free_port

pytestmark = pytest.mark.integration

NODE = "hv-7"


@dataclass
class Server:
    target: str
    store: Store
    grpc: grpc.aio.Server


@dataclass
class Cluster:
    etcd: EtcdSupervisor
    store: Store
    a: Server
    b: Server
    client: RemoteNodeService


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    etcd = EtcdSupervisor(EtcdConfig("t", tmp_path, "127.0.0.1", free_port(), free_port()))
    await etcd.start()
    stores: list[Store] = []
    servers: list[grpc.aio.Server] = []
    client: RemoteNodeService | None = None
    try:

        async def server() -> Server:
            store = Store([etcd.config.client_url], timeout_s=2)
            stores.append(store)
            port = free_port()
            srv = await start_grpc_server(
                "127.0.0.1", port, LocalNodeService(ServiceContext(store))
            )
            servers.append(srv)
            return Server(f"127.0.0.1:{port}", store, srv)

        a, b = await server(), await server()
        store = Store([etcd.config.client_url])
        stores.append(store)
        client = RemoteNodeService([a.target, b.target], timeout_s=3.0, retry_initial_s=0.05)
        yield Cluster(etcd, store, a, b, client)
    finally:
        if client is not None:
            await client.close()
        for srv in servers:
            await srv.stop(None)
        for store in stores:
            await store.close()
        await etcd.stop()


def inventory() -> Inventory:
    return Inventory(
        cpus=8,
        memory_mib=16384,
        disk_gib=200.0,
        disk_free_gib=150.0,
        hostname=NODE,
        kernel="6.1.0",
        corral_version="0.1.0",
        driver="fake",
    )


async def place(store: Store, name: str, node: str) -> Assignment:
    """Create a VM and place it on ``node`` the way the leader's VM loop does."""
    created = await VmService(ServiceContext(store)).create(
        {"name": name, "vcpus": 2, "memory_mib": 256, "restart_policy": "always"}, RequestMeta()
    )
    vm = created.vm
    vm.status.node = node
    vm.status.epoch += 1
    vm.status.state = "starting"
    a = Assignment(
        vm=vm.name,
        vm_id=vm.id,
        node=node,
        epoch=vm.status.epoch,
        generation=vm.generation,
        power_generation=vm.power_generation,
        spec=vm.spec,
    )
    await store.commit(
        [Objects.put(vm), Put(keys.assign_key(node, vm.name), encode("assignment", a))],
        [Objects.expect_unchanged(vm)],
    )
    return a


def running(a: Assignment, state: str = "running") -> VmObservation:
    return VmObservation.model_validate(
        {
            "vm": a.vm,
            "vm_id": a.vm_id,
            "epoch": a.epoch,
            "state": state,
            "observed_generation": a.generation,
        }
    )


async def vm_state(store: Store, name: str) -> str:
    return (await Objects(store).get(Vm, name)).status.state


async def test_a_remote_node_registers_lives_gets_work_and_reports(cluster: Cluster) -> None:
    client, store = cluster.client, cluster.store
    await client.register(
        NODE,
        address="127.0.0.9",
        driver="fake",
        inventory=inventory(),
        labels={"rack": "r2"},
        roles=["compute"],
    )
    node = await Objects(store).get(Node, NODE)
    assert node.status.inventory == inventory()
    assert node.spec.labels == {"rack": "r2"} and node.spec.roles == ["compute"]

    lease = await client.open_liveness(NODE, 10)
    live = await store.get(keys.liveness_key(NODE))
    assert live is not None and live.lease == lease
    assert 0 < await client.keepalive("n1", lease) <= 10

    stream = client.assignments(NODE)
    assert await asyncio.wait_for(anext(stream), 10) == {}
    web = await place(store, "web-1", NODE)
    await place(store, "elsewhere-1", "hv-other")  # another node's work never shows up here
    got = await asyncio.wait_for(anext(stream), 10)
    assert got == {"web-1": web}  # every field travels, the restart policy too
    assert (got["web-1"].power_generation, got["web-1"].spec.restart_policy) == (1, "always")

    await client.report(NODE, [running(web)])
    assert await vm_state(store, "web-1") == "running"
    await client.report(NODE, [running(web, "paused")])
    assert await vm_state(store, "web-1") == "paused"
    await stream.aclose()

    await client.close_liveness(NODE, lease)
    assert await store.get(keys.liveness_key(NODE)) is None


async def test_calls_and_the_stream_go_on_through_b_when_a_stops(cluster: Cluster) -> None:
    client, store = cluster.client, cluster.store
    await client.register(
        NODE, address="127.0.0.9", driver="fake", inventory=inventory(), labels={}, roles=[]
    )
    lease = await client.open_liveness(NODE, 10)
    web = await place(store, "web-1", NODE)
    stream = client.assignments(NODE)
    assert await asyncio.wait_for(anext(stream), 10) == {"web-1": web}
    assert client.endpoint == cluster.a.target

    await cluster.a.grpc.stop(None)

    # The stream re-opens on B, which answers with the full set at once...
    assert await asyncio.wait_for(anext(stream), 10) == {"web-1": web}
    assert client.endpoint == cluster.b.target
    # ...and keeps following changes.
    db = await place(store, "db-1", NODE)
    assert await asyncio.wait_for(anext(stream), 10) == {"web-1": web, "db-1": db}
    await stream.aclose()

    assert await client.keepalive("n1", lease) > 0
    live = await store.get(keys.liveness_key(NODE))
    assert live is not None and live.lease == lease
    await client.report(NODE, [running(db)])
    assert await vm_state(store, "db-1") == "running"


async def test_errors_map_both_ways(cluster: Cluster) -> None:
    client, store = cluster.client, cluster.store
    # The server's validation (pydantic, in LocalNodeService) comes back field by field.
    with pytest.raises(ValidationFailed) as caught:
        await client.register(
            NODE, address="", driver="fake", inventory=inventory(), labels={}, roles=["boss"]
        )
    assert [e.field for e in caught.value.errors] == ["roles.0"]
    assert await Objects(store).find(Node, NODE) is None

    # A report from a node the VM is not placed on changes nothing.
    web = await place(store, "web-1", "hv-other")
    await client.report(NODE, [running(web)])
    assert await vm_state(store, "web-1") == "starting"

    # With the store gone every server answers UNAVAILABLE; the client names both.
    await cluster.etcd.stop()
    with pytest.raises(Unavailable) as gone:
        await client.report("hv-other", [running(web, "crashed")])
    assert cluster.a.target in gone.value.detail and cluster.b.target in gone.value.detail


async def eventually_state(store: Store, name: str, state: str, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (seen := await vm_state(store, name)) != state:
        assert loop.time() < deadline, f"vm {name} is {seen}, not {state}"
        await asyncio.sleep(0.05)


async def test_a_node_agent_runs_its_vms_through_the_servers(
    cluster: Cluster, tmp_path: Path
) -> None:
    agent = NodeAgent(
        NODE,
        cluster.client,
        FakeDriver(tmp_path / "driver"),
        address="127.0.0.9",
        labels={},
        roles=["compute"],
        inventory=inventory(),
        lease_ttl_s=5,
        resync_s=0.2,
        retry_initial_s=0.05,
        retry_max_s=0.5,
    )
    run = asyncio.create_task(agent.run())
    try:
        await place(cluster.store, "web-1", NODE)
        await eventually_state(cluster.store, "web-1", "running")
        live = await cluster.store.get(keys.liveness_key(NODE))
        assert live is not None and live.lease == agent.lease_id

        await cluster.a.grpc.stop(None)
        await place(cluster.store, "db-1", NODE)
        await eventually_state(cluster.store, "db-1", "running")
        assert cluster.client.endpoint == cluster.b.target
    finally:
        await agent.shutdown(timeout_s=2.0)
        await asyncio.wait_for(run, 5.0)
