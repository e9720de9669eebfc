"""The NodeService over gRPC, client side: how a compute-only host reaches the servers.

``RemoteNodeService`` implements ``corral.agent.nodeapi.NodeService`` with calls to
``corral.v1.NodeService`` (``proto/corral/v1/node.proto``) on a list of servers. It imports
only the generated wire stubs (``corral.v1``), never server modules.

Failover: every call goes to the current server. When that server cannot answer (UNAVAILABLE,
DEADLINE_EXCEEDED, or the call cut off by the server going away) the next endpoint becomes
current, round robin, and the call is tried there, at most once per endpoint; when none
answers, ``corral.errors.Unavailable`` names every endpoint tried and why. Calls are retried
only because every NodeService call is idempotent (a retried ``open_liveness`` may leave an
extra lease behind, which expires on its own). A definite answer from a server is never
retried: its status code is mapped back to the ``corral.errors`` exception it came from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from pydantic import ValidationError

from corral.agent.nodeapi import NodeService
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
from corral.model import Assignment, Inventory, VmObservation
from corral.v1 import node_pb2, node_pb2_grpc

if TYPE_CHECKING:
    from corral.v1.node_pb2_grpc import NodeServiceAsyncStub

__all__ = ["RemoteNodeService", "client_credentials"]

log = logging.getLogger(__name__)

R = TypeVar("R")

# Trailing metadata of INVALID_ARGUMENT (see proto/corral/v1/node.proto).
_FIELD_ERRORS_KEY = "corral-field-errors"

# The server cannot answer now; another may. CANCELLED reaches us here only when the server
# cut the call off (stopping); our own cancellation surfaces as asyncio.CancelledError.
_FAILOVER = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Find a dead server under a silent assignment stream within ~15 s (the servers allow it).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A server that comes back is tried again within seconds, not gRPC's default 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


def _error_from(exc: grpc.aio.AioRpcError, endpoint: str) -> CorralError:
    """The corral exception a server's definite answer stands for."""
    code = exc.code()
    details = exc.details() or f"{code.name} from {endpoint}"
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code in (grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS):
        return Conflict(details)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return ValidationFailed(_field_errors(exc) or [FieldError("", "invalid", details)])
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return PreconditionFailed(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TooLarge(details)
    if code in _FAILOVER:
        return Unavailable(f"{endpoint}: {details}")
    return CorralError(f"{endpoint}: {code.name}: {details}")


def _field_errors(exc: grpc.aio.AioRpcError) -> list[FieldError]:
    trailer = exc.trailing_metadata()
    raw = trailer.get(_FIELD_ERRORS_KEY) if trailer is not None else None
    if not isinstance(raw, str):
        return []
    try:
        return [
            FieldError(str(e["field"]), str(e["rule"]), str(e["message"])) for e in json.loads(raw)
        ]
    except (ValueError, TypeError, KeyError):
        return []  # not ours: the details still say what went wrong


def client_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ChannelCredentials:
    """TLS that trusts only the cluster CA and presents this host's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def _dump(model: Inventory | VmObservation) -> str:
    # Defaults left out: a field added later with a default stays readable by older servers.
    return model.model_dump_json(exclude_defaults=True)


class RemoteNodeService(NodeService):
    """``corral.agent.nodeapi.NodeService`` over gRPC, failing over across ``endpoints``.

    ``endpoints`` are gRPC targets of servers (``host:port``). ``timeout_s`` bounds each
    attempt of a unary call (a call tried on every endpoint may take ``len(endpoints)`` times
    that). ``cluster_id``, when set, is sent with every request; a server of another cluster
    refuses it (PreconditionFailed). ``credentials`` (``client_credentials``) make every
    channel TLS: the servers' certificates are checked against the cluster CA and this host's
    certificate is presented. ``retry_initial_s`` / ``retry_max_s`` bound the pause of
    the assignment stream after a whole round of servers failed.

    Use ``async with`` or ``await close()`` to close its channels. Safe for concurrent calls
    from one event loop; they share the notion of the current server.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout_s: float = 5.0,
        cluster_id: str = "",
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("endpoints: at least one server is needed")
        if timeout_s <= 0:
            raise ValueError("timeout_s: must be > 0")
        # Accept the servers' advertised URLs (http://host:port) as well as host:port.
        self._endpoints = [e.split("://", 1)[-1].rstrip("/") for e in endpoints]
        self._timeout_s = timeout_s
        self._cluster_id = cluster_id
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._credentials = credentials
        self._current = 0
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, NodeServiceAsyncStub] = {}

    @property
    def endpoint(self) -> str:
        """The server calls go to now."""
        return self._endpoints[self._current]

    async def close(self) -> None:
        """Close every channel; calls and streams in flight fail. Idempotent."""
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> RemoteNodeService:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _stub(self, index: int) -> NodeServiceAsyncStub:
        # Channels are made lazily: grpc.aio binds one to the event loop that first uses it.
        stub = self._stubs.get(index)
        if stub is None:
            target = self._endpoints[index]
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(target, self._credentials, _CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            self._channels[index] = channel
            stub = self._stubs[index] = node_pb2_grpc.NodeServiceStub(channel)
        return stub

    def _advance(self, failed: int) -> None:
        # Only the first of several concurrent calls that saw this server fail moves on.
        if self._current == failed:
            self._current = (failed + 1) % len(self._endpoints)

    async def _call(self, what: str, invoke: Callable[[NodeServiceAsyncStub], Awaitable[R]]) -> R:
        tried: list[str] = []
        start = self._current
        # Every endpoint once, from the current one on, whatever concurrent calls do meanwhile.
        for k in range(len(self._endpoints)):
            index = (start + k) % len(self._endpoints)
            endpoint = self._endpoints[index]
            try:
                reply = await invoke(self._stub(index))
                self._current = index  # stay with the server that answered
                return reply
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _FAILOVER:
                    raise _error_from(exc, endpoint) from None
                tried.append(f"{endpoint} ({exc.code().name}: {exc.details()})")
                log.info("NodeService.%s: %s cannot answer: %s", what, endpoint, exc.details())
                self._advance(index)
        raise Unavailable(f"no server answered {what}; tried {', '.join(tried)}")

    # -- NodeService ------------------------------------------------------------------------

    async def register(
        self,
        node: str,
        *,
        address: str,
        driver: str,
        inventory: Inventory,
        labels: dict[str, str],
        roles: list[str],
    ) -> None:
        request = node_pb2.RegisterRequest(
            cluster_id=self._cluster_id,
            node=node,
            address=address,
            driver=driver,
            inventory_json=_dump(inventory),
            labels=labels,
            roles=roles,
        )
        await self._call("Register", lambda s: s.Register(request, timeout=self._timeout_s))

    async def open_liveness(self, node: str, ttl_s: int) -> int:
        request = node_pb2.OpenLivenessRequest(cluster_id=self._cluster_id, node=node, ttl_s=ttl_s)
        reply = await self._call(
            "OpenLiveness", lambda s: s.OpenLiveness(request, timeout=self._timeout_s)
        )
        return reply.lease_id

    async def keepalive(self, node: str, lease_id: int) -> int:
        request = node_pb2.KeepaliveRequest(
            cluster_id=self._cluster_id, node=node, lease_id=lease_id
        )
        reply = await self._call(
            "Keepalive", lambda s: s.Keepalive(request, timeout=self._timeout_s)
        )
        return reply.ttl_s

    async def close_liveness(self, node: str, lease_id: int) -> None:
        request = node_pb2.CloseLivenessRequest(
            cluster_id=self._cluster_id, node=node, lease_id=lease_id
        )
        await self._call(
            "CloseLiveness", lambda s: s.CloseLiveness(request, timeout=self._timeout_s)
        )

    async def report(self, node: str, observations: list[VmObservation]) -> None:
        request = node_pb2.ReportRequest(
            cluster_id=self._cluster_id,
            node=node,
            observation_json=[_dump(o) for o in observations],
        )
        await self._call("Report", lambda s: s.Report(request, timeout=self._timeout_s))

    async def report_gone(self, node: str, vm: str, vm_id: str, epoch: int) -> None:
        request = node_pb2.ReportGoneRequest(
            cluster_id=self._cluster_id, node=node, vm=vm, vm_id=vm_id, epoch=epoch
        )
        await self._call("ReportGone", lambda s: s.ReportGone(request, timeout=self._timeout_s))

    async def assignments(self, node: str) -> AsyncGenerator[dict[str, Assignment], None]:
        """Yield the node's full assignment set, at first and after each change.

        When its server dies (or stops) the stream is re-opened on the next server, which
        answers with the full set at once; after a whole round of servers failed it pauses
        with jittered exponential backoff. It never ends on its own. It raises the mapped
        corral error when a server gives a definite answer (say INVALID_ARGUMENT), and
        CorralError when a server sends an assignment this agent cannot read: retrying the
        same question would not help, and the caller keeps acting on the last set it had.
        """
        request = node_pb2.WatchAssignmentsRequest(cluster_id=self._cluster_id, node=node)
        failed_in_a_row = 0
        rounds = 0
        while True:
            index = self._current
            endpoint = self._endpoints[index]
            call = self._stub(index).WatchAssignments(request)
            try:
                async for message in call:
                    failed_in_a_row = rounds = 0
                    yield self._decode_set(message, endpoint)
                why = "the server ended the stream"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _FAILOVER:
                    raise _error_from(exc, endpoint) from None
                why = f"{exc.code().name}: {exc.details()}"
            finally:
                call.cancel()
            self._advance(index)
            log.warning(
                "assignment stream of %s from %s broke (%s); re-opening it on %s",
                node,
                endpoint,
                why,
                self.endpoint,
            )
            failed_in_a_row += 1
            if failed_in_a_row >= len(self._endpoints):
                failed_in_a_row = 0
                delay = min(self._retry_max_s, self._retry_initial_s * 2.0**rounds)
                rounds = min(rounds + 1, 32)
                # Jitter: hundreds of agents must not come back in lockstep.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    @staticmethod
    def _decode_set(message: node_pb2.AssignmentSet, endpoint: str) -> dict[str, Assignment]:
        try:
            items = [Assignment.model_validate_json(raw) for raw in message.assignment_json]
        except ValidationError as exc:
            raise CorralError(
                f"{endpoint} sent an assignment this agent cannot read "
                f"(a newer corral on the server?): {exc}"
            ) from None
        return {a.vm: a for a in items}
