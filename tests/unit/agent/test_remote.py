"""RemoteNodeService against real gRPC servers (NodeServicer) over in-memory NodeServices.

The etcd-backed end-to-end path is in tests/integration/test_grpc_node.py; here the backends
are fakes, so failover, stream re-opening and the error mapping can be driven exactly.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from corral.agent.remote import RemoteNodeService
from corral.api.grpc import NodeServicer
from corral.errors import (
    Conflict,
    CorralError,
    FieldError,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
    ValidationFailed,
)
from corral.model import VmObservation
from corral.v1 import node_pb2, node_pb2_grpc

from .fakes import FakeNodeService, assignment, inventory

Serve = Callable[..., Awaitable[str]]


def _dead_target() -> str:
    """An address nobody listens on (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, grpc.aio.Server]]:
    running: dict[str, grpc.aio.Server] = {}
    yield running
    for server in running.values():
        await server.stop(None)


@pytest.fixture
def serve(servers: dict[str, grpc.aio.Server]) -> Serve:
    """Start a gRPC server on a free port over ``backend``; return its target."""

    async def start(backend: Any, *, cluster_id: str = "") -> str:
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeServiceServicer_to_server(
            NodeServicer(backend, cluster_id=cluster_id), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = f"127.0.0.1:{port}"
        servers[target] = server
        return target

    return start


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., RemoteNodeService]]:
    made: list[RemoteNodeService] = []

    def make(endpoints: list[str], **kw: Any) -> RemoteNodeService:
        client = RemoteNodeService(endpoints, timeout_s=kw.pop("timeout_s", 2.0), **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def observation(vm: str = "web-1", state: str = "running") -> VmObservation:
    return VmObservation.model_validate(
        {"vm": vm, "vm_id": f"id-{vm}", "epoch": 3, "state": state, "observed_generation": 2}
    )


async def test_every_call_reaches_the_server_side_service_intact(
    serve: Serve, clients: Callable[..., RemoteNodeService]
) -> None:
    fake = FakeNodeService()
    client = clients([await serve(fake)])

    await client.register(
        "hv-1",
        address="10.0.0.7",
        driver="fake",
        inventory=inventory(),
        labels={"rack": "r1"},
        roles=["compute"],
    )
    lease = await client.open_liveness("hv-1", 9)
    assert await client.keepalive("n1", lease) == 9
    await client.report("hv-1", [observation(), observation("db-1", "crashed")])
    await client.report_gone("hv-1", "old-1", "id-old-1", 4)
    await client.close_liveness("hv-1", lease)

    assert fake.registrations == [
        {
            "node": "hv-1",
            "address": "10.0.0.7",
            "driver": "fake",
            "inventory": inventory(),
            "labels": {"rack": "r1"},
            "roles": ["compute"],
        }
    ]
    assert fake.leases_opened == [lease] and fake.keepalives == [lease]
    assert fake.revoked == [lease]
    assert fake.reports == [observation(), observation("db-1", "crashed")]
    assert fake.gone == [("old-1", "id-old-1", 4)]


async def test_the_assignment_stream_carries_full_sets(
    serve: Serve, clients: Callable[..., RemoteNodeService]
) -> None:
    fake = FakeNodeService()
    client = clients([await serve(fake)])
    stream = client.assignments("hv-1")
    first, second = assignment("a", generation=3), assignment("b", power_state="stopped")
    fake.assign(first, second)
    assert await anext(stream) == {"a": first, "b": second}
    fake.assign(second)
    assert await anext(stream) == {"b": second}
    fake.assign()
    assert await anext(stream) == {}
    await stream.aclose()


class RaisingNodeService(FakeNodeService):
    """Every unary call raises ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.calls = 0

    async def report(self, node: str, observations: list[VmObservation]) -> None:
        self.calls += 1
        raise self.error

    async def open_liveness(self, node: str, ttl_s: int) -> int:
        self.calls += 1
        raise self.error


@pytest.mark.parametrize(
    ("raised", "expected", "detail"),
    [
        (NotFound("vm 'web-1' not found"), NotFound, "vm 'web-1' not found"),
        (Conflict("the state changed concurrently"), Conflict, "the state changed concurrently"),
        (PreconditionFailed("stale"), PreconditionFailed, "stale"),
        (TooLarge("too many observations"), TooLarge, "too many observations"),
        (RuntimeError("boom"), CorralError, "INTERNAL: RuntimeError: boom"),
        (CorralError("store record unreadable"), CorralError, "store record unreadable"),
    ],
)
async def test_server_errors_come_back_as_the_same_corral_errors(
    serve: Serve,
    clients: Callable[..., RemoteNodeService],
    raised: Exception,
    expected: type[CorralError],
    detail: str,
) -> None:
    backend = RaisingNodeService(raised)
    client = clients([await serve(backend), await serve(backend)])
    with pytest.raises(expected) as caught:
        await client.report("hv-1", [observation()])
    assert type(caught.value) is expected
    assert detail in caught.value.detail
    assert backend.calls == 1  # a definite answer is not retried on the next server


async def test_field_errors_survive_the_trip(
    serve: Serve, clients: Callable[..., RemoteNodeService]
) -> None:
    errors = [FieldError("ttl_s", "maximum", "must be <= 300"), FieldError("node", "x", "bad")]
    client = clients([await serve(RaisingNodeService(ValidationFailed(errors)))])
    with pytest.raises(ValidationFailed) as caught:
        await client.open_liveness("hv-1", 900)
    assert caught.value.errors == errors


async def test_the_server_validates_what_the_wire_carries(serve: Serve) -> None:
    fake = FakeNodeService()
    target = await serve(fake)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Report(
                node_pb2.ReportRequest(node="hv-1", observation_json=['{"vm": "web-1"}'])
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "observation_json.0.vm_id" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.OpenLiveness(node_pb2.OpenLivenessRequest(node="", ttl_s=5))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "node: must not be empty"
    assert fake.reports == [] and fake.leases_opened == []


async def test_a_server_of_another_cluster_refuses(
    serve: Serve, clients: Callable[..., RemoteNodeService]
) -> None:
    fake = FakeNodeService()
    target = await serve(fake, cluster_id="c-1")
    with pytest.raises(PreconditionFailed, match="belongs to cluster c-1, not c-2"):
        await clients([target], cluster_id="c-2").open_liveness("hv-1", 5)
    assert await clients([target], cluster_id="c-1").open_liveness("hv-1", 5) > 0
    assert len(fake.leases_opened) == 1


async def test_calls_move_on_to_the_next_server(
    serve: Serve, clients: Callable[..., RemoteNodeService]
) -> None:
    fake = FakeNodeService()
    dead, live = _dead_target(), await serve(fake)
    client = clients([dead, live])
    await client.report("hv-1", [observation()])
    assert client.endpoint == live
    assert fake.reports == [observation()]


async def test_no_server_answering_is_unavailable_naming_each(
    serve: Serve, clients: Callable[..., RemoteNodeService]
) -> None:
    # One server is down, the other is up but its store is not (it answers UNAVAILABLE).
    dead = _dead_target()
    storeless = await serve(RaisingNodeService(Unavailable("etcd cluster is unreachable")))
    client = clients([dead, storeless])
    with pytest.raises(Unavailable) as caught:
        await client.report("hv-1", [observation()])
    message = caught.value.detail
    assert f"{dead} (UNAVAILABLE" in message
    assert f"{storeless} (UNAVAILABLE: etcd cluster is unreachable)" in message


async def test_the_stream_reopens_on_the_next_server_when_its_server_stops(
    serve: Serve,
    servers: dict[str, grpc.aio.Server],
    clients: Callable[..., RemoteNodeService],
) -> None:
    fake_a, fake_b = FakeNodeService(), FakeNodeService()
    a, b = await serve(fake_a), await serve(fake_b)
    client = clients([a, b], retry_initial_s=0.01)
    stream = client.assignments("hv-1")
    fake_a.assign(assignment("web-1"))
    assert await anext(stream) == {"web-1": assignment("web-1")}

    await servers.pop(a).stop(None)
    fake_b.assign(assignment("web-1"), assignment("web-2"))
    got = await anext(stream)
    assert got == {"web-1": assignment("web-1"), "web-2": assignment("web-2")}
    assert client.endpoint == b and fake_b.subscriptions == 1
    # Unary calls follow to the same server.
    await client.report("hv-1", [observation()])
    assert fake_b.reports == [observation()]
    await stream.aclose()


async def test_the_stream_outlasts_a_time_with_no_server_at_all(
    servers: dict[str, grpc.aio.Server], clients: Callable[..., RemoteNodeService]
) -> None:
    target = _dead_target()
    client = clients([target], retry_initial_s=0.01, retry_max_s=0.05)
    stream = client.assignments("hv-1")
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.5)
    assert not pending.done()  # no server: it keeps trying instead of ending or raising

    fake = FakeNodeService()
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(fake), server)
    server.add_insecure_port(target)
    await server.start()
    servers[target] = server
    fake.assign(assignment("web-1"))
    assert await asyncio.wait_for(pending, 10.0) == {"web-1": assignment("web-1")}
    await stream.aclose()


class JunkServicer(NodeServicer):
    """A server of some other corral that sends assignments this one cannot read."""

    async def WatchAssignments(
        self, request: node_pb2.WatchAssignmentsRequest, context: Any
    ) -> AsyncIterator[node_pb2.AssignmentSet]:
        yield node_pb2.AssignmentSet(assignment_json=['{"vm": "web-1", "colour": "blue"}'])


async def test_an_unreadable_assignment_is_an_error_not_an_empty_set(
    servers: dict[str, grpc.aio.Server], clients: Callable[..., RemoteNodeService]
) -> None:
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServiceServicer_to_server(JunkServicer(FakeNodeService()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servers["junk"] = server
    stream = clients([f"127.0.0.1:{port}"]).assignments("hv-1")
    # An empty set would make the agent destroy every VM it runs.
    with pytest.raises(CorralError, match="cannot read"):
        await anext(stream)


class HangingNodeService(FakeNodeService):
    """A server whose store hangs: reports never return."""

    async def report(self, node: str, observations: list[VmObservation]) -> None:
        await asyncio.Event().wait()


async def test_a_hanging_server_is_left_after_the_timeout(
    serve: Serve, clients: Callable[..., RemoteNodeService]
) -> None:
    fake = FakeNodeService()
    hanging, live = await serve(HangingNodeService()), await serve(fake)
    client = clients([hanging, live], timeout_s=0.3)
    await client.report("hv-1", [observation()])
    assert client.endpoint == live and fake.reports == [observation()]
