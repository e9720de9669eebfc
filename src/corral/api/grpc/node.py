"""The NodeService over gRPC, server side: every server serves it to the node agents.

``NodeServicer`` adapts any object with the methods of ``corral.agent.nodeapi.NodeService``
(in practice ``corral.service.node_api.LocalNodeService``) to ``corral.v1.NodeService``
(``proto/corral/v1/node.proto``). It is the one boundary where corral errors become gRPC
status codes (``status_of``); the client in ``corral.agent.remote`` maps them back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
from pydantic import BaseModel, ValidationError

from corral.agent.nodeapi import NodeService
from corral.errors import (
    Conflict,
    CorralError,
    FieldError,
    Malformed,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
    ValidationFailed,
)
from corral.model import Inventory, VmObservation
from corral.v1 import node_pb2, node_pb2_grpc

__all__ = [
    "FIELD_ERRORS_KEY",
    "SERVER_OPTIONS",
    "NodeServicer",
    "server_credentials",
    "start_grpc_server",
    "status_of",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]

# Trailing metadata of INVALID_ARGUMENT: a JSON list of {"field", "rule", "message"}.
FIELD_ERRORS_KEY = "corral-field-errors"

# Most specific first: Unschedulable is a Conflict, and so it is ABORTED too.
_CODES: tuple[tuple[type[CorralError], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ABORTED),
    (ValidationFailed, grpc.StatusCode.INVALID_ARGUMENT),
    (Malformed, grpc.StatusCode.INVALID_ARGUMENT),
    (PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    # Agents ping every 10 s to find a dead server under a silent stream; gRPC's default
    # (one ping per 5 min, none without a call) would answer them with GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    # And the server pings too, so the etcd watch behind a dead agent's stream is released.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status code, details and trailing metadata that report ``exc`` to a client.

    NotFound -> NOT_FOUND, Conflict -> ABORTED, ValidationFailed and Malformed (and a pydantic
    ValidationError of a request payload) -> INVALID_ARGUMENT with the field errors in the
    ``corral-field-errors`` trailer, PreconditionFailed -> FAILED_PRECONDITION, TooLarge ->
    RESOURCE_EXHAUSTED, Unavailable -> UNAVAILABLE, anything else -> INTERNAL with its message.
    """
    if isinstance(exc, ValidationError):
        exc = ValidationFailed(_field_errors(exc))
    if isinstance(exc, CorralError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                trailer: tuple[tuple[str, str], ...] = ()
                if isinstance(exc, ValidationFailed):
                    errors = [
                        {"field": e.field, "rule": e.rule, "message": e.message} for e in exc.errors
                    ]
                    # ensure_ascii: metadata values must be printable ASCII.
                    trailer = ((FIELD_ERRORS_KEY, json.dumps(errors, ensure_ascii=True)),)
                return code, exc.detail, trailer
        return grpc.StatusCode.INTERNAL, exc.detail, ()
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return grpc.StatusCode.INTERNAL, message, ()


def _field_errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        name = f"{prefix}.{path}" if prefix and path else prefix or path
        out.append(FieldError(name, err["type"], err["msg"]))
    return out


def _decode(model: type[M], raw: str, field: str) -> M:
    """Validate one ``*_json`` request field; a bad one is ValidationFailed naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ValidationFailed(_field_errors(exc, field)) from None


def _required(value: str, field: str) -> str:
    if not value:
        raise ValidationFailed.one(field, "required", "must not be empty")
    return value


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    """``corral.v1.NodeService`` over any object with the NodeService Protocol's methods.

    Every handler validates its request, calls the wrapped service once, and turns any error
    into a status with ``status_of`` (INTERNAL errors are logged with their traceback here,
    since the client only sees the message). When ``cluster_id`` is set, a request naming
    another cluster is refused with FAILED_PRECONDITION; a request naming none is served.
    """

    def __init__(
        self, node_service: NodeService, *, cluster_id: str = "", check_peer: bool = False
    ) -> None:
        self._ns = node_service
        self._cluster_id = cluster_id
        self._check_peer = check_peer

    def _check(self, request: Any, context: Context) -> None:
        requested = request.cluster_id
        if self._cluster_id and requested and requested != self._cluster_id:
            raise PreconditionFailed(
                f"this server belongs to cluster {self._cluster_id}, not {requested}"
            )
        if self._check_peer:
            # Over TLS a host speaks only for itself: its certificate names it.
            names = list(context.auth_context().get("x509_common_name") or [])
            peer = names[0].decode() if names else ""
            if request.node and peer != request.node:
                raise PreconditionFailed(
                    f"this connection's certificate is {peer or 'unnamed'}'s; it cannot act "
                    f"for node {request.node!r}"
                )

    async def _serve(self, context: Context, method: str, call: Callable[[], Awaitable[R]]) -> R:
        try:
            return await call()
        except Exception as exc:
            await self._abort(context, method, exc)

    async def _abort(self, context: Context, method: str, exc: Exception) -> NoReturn:
        code, details, trailer = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("NodeService.%s failed: %s", method, details, exc_info=exc)
        else:
            log.info("NodeService.%s: %s: %s", method, code.name, details)
        await context.abort(code, details, trailer)

    async def Register(
        self, request: node_pb2.RegisterRequest, context: Context
    ) -> node_pb2.RegisterResponse:
        async def call() -> node_pb2.RegisterResponse:
            self._check(request, context)
            await self._ns.register(
                _required(request.node, "node"),
                address=request.address,
                driver=request.driver,
                inventory=_decode(Inventory, request.inventory_json, "inventory_json"),
                labels=dict(request.labels),
                roles=list(request.roles),
            )
            return node_pb2.RegisterResponse()

        return await self._serve(context, "Register", call)

    async def OpenLiveness(
        self, request: node_pb2.OpenLivenessRequest, context: Context
    ) -> node_pb2.OpenLivenessResponse:
        async def call() -> node_pb2.OpenLivenessResponse:
            self._check(request, context)
            if request.ttl_s < 1:
                raise ValidationFailed.one("ttl_s", "minimum", "must be >= 1")
            lease = await self._ns.open_liveness(_required(request.node, "node"), request.ttl_s)
            return node_pb2.OpenLivenessResponse(lease_id=lease)

        return await self._serve(context, "OpenLiveness", call)

    async def Keepalive(
        self, request: node_pb2.KeepaliveRequest, context: Context
    ) -> node_pb2.KeepaliveResponse:
        async def call() -> node_pb2.KeepaliveResponse:
            self._check(request, context)
            ttl = await self._ns.keepalive(request.node, request.lease_id)
            return node_pb2.KeepaliveResponse(ttl_s=ttl)

        return await self._serve(context, "Keepalive", call)

    async def CloseLiveness(
        self, request: node_pb2.CloseLivenessRequest, context: Context
    ) -> node_pb2.CloseLivenessResponse:
        async def call() -> node_pb2.CloseLivenessResponse:
            self._check(request, context)
            await self._ns.close_liveness(_required(request.node, "node"), request.lease_id)
            return node_pb2.CloseLivenessResponse()

        return await self._serve(context, "CloseLiveness", call)

    async def WatchAssignments(
        self, request: node_pb2.WatchAssignmentsRequest, context: Context
    ) -> AsyncIterator[node_pb2.AssignmentSet]:
        """Stream the node's full assignment set, once at first and after every change.

        Ends only when the client goes away, the server stops, or the wrapped stream raises
        (then with that error's status)."""
        try:
            self._check(request, context)
            stream = self._ns.assignments(_required(request.node, "node"))
        except Exception as exc:
            await self._abort(context, "WatchAssignments", exc)
        try:
            async for current in stream:
                yield node_pb2.AssignmentSet(
                    assignment_json=[
                        current[vm].model_dump_json(exclude_defaults=True) for vm in sorted(current)
                    ]
                )
        except Exception as exc:
            await self._abort(context, "WatchAssignments", exc)
        finally:
            # Releases the store watch behind the stream when the client goes away.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # a broken stream may fail to close; it is dropped anyway
                    log.debug("closing an assignment stream failed", exc_info=True)

    async def Report(
        self, request: node_pb2.ReportRequest, context: Context
    ) -> node_pb2.ReportResponse:
        async def call() -> node_pb2.ReportResponse:
            self._check(request, context)
            node = _required(request.node, "node")
            observations = [
                _decode(VmObservation, raw, f"observation_json.{i}")
                for i, raw in enumerate(request.observation_json)
            ]
            await self._ns.report(node, observations)
            return node_pb2.ReportResponse()

        return await self._serve(context, "Report", call)

    async def ReportGone(
        self, request: node_pb2.ReportGoneRequest, context: Context
    ) -> node_pb2.ReportGoneResponse:
        async def call() -> node_pb2.ReportGoneResponse:
            self._check(request, context)
            await self._ns.report_gone(
                _required(request.node, "node"),
                _required(request.vm, "vm"),
                _required(request.vm_id, "vm_id"),
                request.epoch,
            )
            return node_pb2.ReportGoneResponse()

        return await self._serve(context, "ReportGone", call)


def server_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """TLS with this host's certificate that requires a client certificate of the cluster CA."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


async def start_grpc_server(
    bind: str,
    port: int,
    node_service: NodeService,
    *,
    cluster_id: str = "",
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.aio.Server:
    """Serve the NodeService on ``bind:port`` and return the started server.

    With ``credentials`` (``server_credentials``) the port is TLS with client certificate
    authentication, and a caller may only act for the node its certificate names. Without,
    the port is INSECURE: plaintext and unauthenticated (tests of the wire protocol only).

    Stop it with ``await server.stop(grace_s)``: streams still open after the grace are
    cancelled, and their agents re-open them on another server. Raises OSError when the
    address cannot be bound.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    node_pb2_grpc.add_NodeServiceServicer_to_server(
        NodeServicer(node_service, cluster_id=cluster_id, check_peer=credentials is not None),
        server,
    )
    address = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    try:
        if credentials is not None:
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot serve gRPC on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot serve gRPC on {address}")
    await server.start()
    log.info(
        "serving the gRPC NodeService on %s (%s)",
        address,
        "TLS, client certificates required" if credentials is not None else "insecure",
    )
    return server
