"""A VM's consoles, wherever the VM runs: the tail of its serial output, and interactive
serial and VNC consoles opened with a short-lived ticket (see ``console_tickets``).

The host that runs the VM serves its consoles itself; any other server forwards the request to
that host's API with ``local=true`` (plain HTTP for the log, a WebSocket for interactive
consoles). Nothing here talks to the hypervisor: the host's own consoles come from callables
the daemon passes in.

An interactive console is a *channel*: ``recv()`` returns the next bytes, or None once it has
closed (``close_code`` and ``close_reason`` then say why, as WebSocket close codes); ``send()``
writes; ``close()`` ends it (idempotent). Errors before a channel opens are ``CorralError``s;
``close_code_for`` gives the WebSocket close code for one (``CLOSE_CODES``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from corral.errors import Conflict, CorralError, NotFound, Unavailable, ValidationFailed
from corral.model import Node, Vm
from corral.service.console_tickets import (
    CONSOLE_KINDS,
    ConsoleKind,
    ConsoleTickets,
    Ticket,
    TicketRefused,
)
from corral.service.context import ServiceContext

__all__ = [
    "CLOSE_CODES",
    "ConsoleChannel",
    "ConsoleService",
    "LocalConsole",
    "OpenLocalConsole",
    "RemoteChannel",
    "close_code_for",
    "console_path",
    "parse_kind",
    "ws_base",
]

# Reads up to N trailing bytes of a VM's console on this host; None if it has no console here.
LocalConsole = Callable[[str, int], Awaitable[bytes | None]]

# WebSocket close codes of a console that could not open (or ended), by cause.
CLOSE_CODES = {
    "ticket": 1008,  # policy violation: missing, bad, expired, used or mismatched ticket
    "not-found": 4404,  # no such VM (or not on the host that was asked)
    "conflict": 4409,  # the VM has no such console now (stopped, fake driver, ...)
    "unavailable": 4503,  # the VM's host or its QEMU did not answer; retry
    "internal": 1011,  # a bug in corral
}
# The states in which a VM's QEMU runs, so its consoles can be opened.
_OPEN_STATES = ("running", "paused")
_WS_MAX_MESSAGE = 1024 * 1024


class ConsoleChannel(Protocol):
    """Bytes to and from one console (see the module docstring)."""

    close_code: int
    close_reason: str

    async def recv(self) -> bytes | None: ...

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


# Opens a channel to console ``kind`` of local VM ``name`` whose id must be ``vm_id``; raises
# NotFound / Conflict / Unavailable.
OpenLocalConsole = Callable[[str, str, ConsoleKind], Awaitable[ConsoleChannel]]


def close_code_for(exc: CorralError) -> int:
    """The WebSocket close code telling a console client why it could not open."""
    if isinstance(exc, TicketRefused):
        return CLOSE_CODES["ticket"]
    if isinstance(exc, NotFound):
        return CLOSE_CODES["not-found"]
    if isinstance(exc, Conflict):
        return CLOSE_CODES["conflict"]
    if isinstance(exc, Unavailable):
        return CLOSE_CODES["unavailable"]
    return CLOSE_CODES["internal"]


def console_path(name: str, kind: ConsoleKind) -> str:
    """The WebSocket path of a VM's console of ``kind`` (without the query)."""
    return f"/api/v1/vms/{name}/console" if kind == "serial" else f"/api/v1/vms/{name}/vnc"


def ws_base(address: str) -> str:
    """The ws:// (or wss://) base of an API address such as ``http://10.0.0.1:8700``."""
    address = address.rstrip("/")
    if address.startswith("https://"):
        return "wss://" + address.removeprefix("https://")
    return "ws://" + address.removeprefix("http://")


class RemoteChannel:
    """A channel to a console served by another host's API (a WebSocket client)."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.close_code = 1000
        self.close_reason = ""

    @classmethod
    async def open(cls, url: str, what: str) -> RemoteChannel:
        """Connect to ``url``; Unavailable naming ``what`` when it cannot be reached."""
        try:
            ws = await connect(url, open_timeout=10.0, max_size=_WS_MAX_MESSAGE, compression=None)
        except InvalidStatus as exc:
            raise Unavailable(
                f"{what} refused the console ({exc.response.status_code}); retry"
            ) from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise Unavailable(f"{what} did not answer: {exc or type(exc).__name__}") from exc
        return cls(ws)

    async def recv(self) -> bytes | None:
        try:
            message = await self._ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
            else:
                self.close_code = CLOSE_CODES["unavailable"]
                self.close_reason = "the VM's host dropped the connection"
            return None
        return message.encode() if isinstance(message, str) else message

    async def send(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(data)

    async def close(self) -> None:
        await self._ws.close()


def parse_kind(body: dict[str, Any] | None) -> ConsoleKind:
    """The console kind a ticket request asks for (``{"console": "serial"}`` by default)."""
    body = body or {}
    unknown = sorted(set(body) - {"console"})
    if unknown:
        raise ValidationFailed.one(unknown[0], "unknown", "unknown field; only console is known")
    kind = body.get("console", "serial")
    if kind not in CONSOLE_KINDS:
        raise ValidationFailed.one(
            "console", "enum", f"must be one of {', '.join(CONSOLE_KINDS)}, not {kind!r}"
        )
    return kind  # type: ignore[no-any-return]


class ConsoleService:
    def __init__(
        self,
        ctx: ServiceContext,
        node: str,
        local: LocalConsole,
        *,
        tickets: ConsoleTickets | None = None,
        open_local: OpenLocalConsole | None = None,
    ) -> None:
        self.ctx = ctx
        self.node = node
        self.local = local
        self.tickets = tickets
        self.open_local = open_local

    # -- the log -------------------------------------------------------------------------------

    async def tail(self, name: str, max_bytes: int, *, local_only: bool = False) -> bytes:
        """The last ``max_bytes`` of the VM's console. NotFound when there is none."""
        if local_only:
            return await self._read_here(name, max_bytes)
        vm = await self.ctx.objects.get(Vm, name)
        host = vm.status.node
        if host is None:
            raise NotFound(f"vm {name!r} has not been placed on a host yet, so it has no console")
        if host == self.node:
            return await self._read_here(name, max_bytes)
        node = await self.ctx.objects.get(Node, host)
        url = f"{node.status.address.rstrip('/')}/api/v1/vms/{name}/console/log"
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                resp = await client.get(url, params={"bytes": max_bytes, "local": "true"})
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"host {host} (which runs vm {name!r}) did not answer: {exc}"
            ) from exc
        if resp.status_code == 404:
            raise NotFound(resp.json().get("detail", f"no console for vm {name!r} on {host}"))
        if resp.status_code != 200:
            raise Unavailable(f"host {host} answered {resp.status_code} for vm {name!r}'s console")
        return resp.content

    async def _read_here(self, name: str, max_bytes: int) -> bytes:
        data = await self.local(name, max_bytes)
        if data is None:
            raise NotFound(
                f"vm {name!r} has no console log on host {self.node} (not defined here, or its "
                "driver has no serial console, e.g. the fake driver)"
            )
        return data

    # -- interactive consoles ------------------------------------------------------------------

    def _tickets(self) -> ConsoleTickets:
        if self.tickets is None:
            raise Unavailable("this server cannot issue or check console tickets yet; retry")
        return self.tickets

    async def ticket(self, name: str, kind: ConsoleKind) -> dict[str, Any]:
        """A ticket for the VM's ``kind`` console: ``{ticket, vm, vm_id, console, expires_at,
        path}``. NotFound for no such VM; Conflict when it has no such console now (not
        placed, not running, or its host's driver has no consoles)."""
        tickets = self._tickets()
        vm = await self.ctx.objects.get(Vm, name)
        host = vm.status.node
        if host is None:
            raise Conflict(f"vm {name} has not been placed on a host yet, so it has no console")
        if vm.status.state not in _OPEN_STATES:
            raise Conflict(
                f"vm {name} is {vm.status.state}, so its {kind} console is closed; start it "
                f"first (corral vm start {name}); `corral vm log {name}` shows its past output"
            )
        node = await self.ctx.objects.get(Node, host)
        if node.status.driver and node.status.driver != "qemu":
            raise Conflict(
                f"vm {name} runs on host {host} with the {node.status.driver} driver, which has "
                f"no {kind} console (only the qemu driver has consoles)"
            )
        issued = tickets.issue(name, vm.id, kind)
        expires = datetime.fromtimestamp(issued.expires_at, UTC)
        return {
            "ticket": issued.token,
            "vm": name,
            "vm_id": vm.id,
            "console": kind,
            "expires_at": expires.isoformat().replace("+00:00", "Z"),
            "path": f"{console_path(name, kind)}?{urlencode({'ticket': issued.token})}",
        }

    async def open(
        self, name: str, kind: ConsoleKind, ticket: str | None, *, local_only: bool = False
    ) -> ConsoleChannel:
        """A channel to the VM's ``kind`` console, here or through the host that runs it.

        Raises TicketRefused (bad ticket), NotFound, Conflict or Unavailable; see
        ``close_code_for``. The ticket is consumed by the host that serves the console."""
        tickets = self._tickets()
        if local_only:
            return await self._open_here(tickets.verify(ticket, name, kind, consume=True))
        claims = tickets.verify(ticket, name, kind, consume=False)
        vm = await self.ctx.objects.get(Vm, name)
        if vm.id != claims.vm_id:
            raise TicketRefused(
                f"ticket: issued for an earlier vm {name!r} (deleted and created again); "
                f"get a new one with POST /api/v1/vms/{name}/console/ticket"
            )
        host = vm.status.node
        if host is None:
            raise Conflict(f"vm {name} has not been placed on a host yet, so it has no console")
        if host == self.node:
            return await self._open_here(tickets.verify(ticket, name, kind, consume=True))
        node = await self.ctx.objects.get(Node, host)
        query = urlencode({"ticket": claims.token, "local": "true"})
        url = f"{ws_base(node.status.address)}{console_path(name, kind)}?{query}"
        return await RemoteChannel.open(url, f"host {host} (which runs vm {name})")

    async def _open_here(self, claims: Ticket) -> ConsoleChannel:
        if self.open_local is None:
            raise Conflict(f"host {self.node} serves no consoles")
        channel: ConsoleChannel = await self.open_local(claims.vm, claims.vm_id, claims.kind)
        return channel
