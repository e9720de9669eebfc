"""The console WebSockets of a compute host's API: the ticket is checked, bytes flow both
ways, and every refusal closes the socket with a code and a reason that says what to do."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from corral.api.rest.proxy import create_proxy_app
from corral.api.rest.ws import close_reason
from corral.errors import Conflict
from corral.service.console_tickets import ConsoleKind, ConsoleTickets


class EchoChannel:
    """A console whose guest answers every line it is sent, in capitals."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.close_code = 1000
        self.close_reason = ""
        self.closed = False
        self.queue.put_nowait(b"hello from the guest\r\n")

    async def recv(self) -> bytes | None:
        data = await self.queue.get()
        if data == b"POWEROFF\n":
            self.close_code, self.close_reason = 1001, "vm web-1's console closed: the VM stopped"
            return None
        return data

    async def send(self, data: bytes) -> None:
        await self.queue.put(data.upper())

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def tickets() -> ConsoleTickets:
    return ConsoleTickets.from_secret("the-cluster-gossip-key")


@pytest.fixture
def opened() -> list[tuple[str, str, str]]:
    return []


@pytest.fixture
async def api(tickets: ConsoleTickets, opened: list[tuple[str, str, str]]) -> AsyncIterator[str]:
    """A compute host's API (the proxy app) under uvicorn on a free port: its ws:// base."""

    async def open_local(name: str, vm_id: str, kind: ConsoleKind) -> EchoChannel:
        opened.append((name, vm_id, kind))
        if name == "fake-1":
            raise Conflict("vm fake-1 runs on host c1 with the fake driver, which has no console")
        return EchoChannel()

    async def no_log(name: str, max_bytes: int) -> bytes | None:
        return None

    async def ready() -> list[str]:
        return []

    app = create_proxy_app(lambda: [], ready, no_log, tickets=tickets, open_local=open_local)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    yield f"ws://127.0.0.1:{port}"
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """The code and reason the server closed ``ws`` with (reading anything still queued)."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None, "the server closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


async def refusal(url: str) -> tuple[int, str]:
    async with connect(url) as ws:
        return await closed_with(ws)


async def test_a_ticketed_console_pipes_bytes_both_ways(
    api: str, tickets: ConsoleTickets, opened: list[tuple[str, str, str]]
) -> None:
    ticket = tickets.issue("web-1", "id-1", "serial").token
    async with connect(f"{api}/api/v1/vms/web-1/console?ticket={ticket}&local=true") as ws:
        assert await ws.recv() == b"hello from the guest\r\n"
        await ws.send(b"echo hi\n")
        assert await ws.recv() == b"ECHO HI\n"
        await ws.send("text too\n")
        assert await ws.recv() == b"TEXT TOO\n"
        await ws.send(b"poweroff\n")
        code, reason = await closed_with(ws)
    assert (code, reason) == (1001, "vm web-1's console closed: the VM stopped")
    assert opened == [("web-1", "id-1", "serial")]


async def test_the_vnc_socket_offers_the_binary_subprotocol(
    api: str, tickets: ConsoleTickets
) -> None:
    ticket = tickets.issue("web-1", "id-1", "vnc").token
    url = f"{api}/api/v1/vms/web-1/vnc?ticket={ticket}&local=true"
    async with connect(url, subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "binary"
        assert await ws.recv() == b"hello from the guest\r\n"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("local=true", "ticket: required"),
        ("ticket=nonsense&local=true", "ticket: not a console ticket"),
        ("ticket={other_vm}&local=true", "ticket: issued for vm 'db-1', not 'web-1'"),
        ("ticket={vnc}&local=true", "ticket: issued for the vnc console, not the serial console"),
    ],
)
async def test_a_bad_ticket_closes_with_policy_violation(
    api: str,
    tickets: ConsoleTickets,
    opened: list[tuple[str, str, str]],
    query: str,
    reason: str,
) -> None:
    query = query.format(
        other_vm=tickets.issue("db-1", "id-2", "serial").token,
        vnc=tickets.issue("web-1", "id-1", "vnc").token,
    )
    code, said = await refusal(f"{api}/api/v1/vms/web-1/console?{query}")
    assert code == 1008
    assert said.startswith(reason)
    assert "POST /api/v1/vms/web-1/console/ticket" in said, "says how to get a new one"
    assert opened == [], "no console opened"


async def test_a_ticket_opens_one_console_only(api: str, tickets: ConsoleTickets) -> None:
    ticket = tickets.issue("web-1", "id-1", "serial").token
    url = f"{api}/api/v1/vms/web-1/console?ticket={ticket}&local=true"
    async with connect(url) as ws:
        assert await ws.recv()
    code, said = await refusal(url)
    assert (code, said.split(";")[0]) == (1008, "ticket: already used (a ticket opens one console)")


async def test_a_vm_without_a_console_closes_with_4409(api: str, tickets: ConsoleTickets) -> None:
    ticket = tickets.issue("fake-1", "id-3", "serial").token
    code, said = await refusal(f"{api}/api/v1/vms/fake-1/console?ticket={ticket}&local=true")
    assert code == 4409
    assert "fake driver" in said


async def test_without_a_reachable_server_a_forwarded_console_closes_with_4503(
    api: str, tickets: ConsoleTickets
) -> None:
    ticket = tickets.issue("web-1", "id-1", "serial").token
    code, said = await refusal(f"{api}/api/v1/vms/web-1/console?ticket={ticket}")
    assert code == 4503
    assert "could not reach any server" in said


def test_close_reasons_fit_in_a_close_frame() -> None:
    long = "vm " + "x" * 63 + " é" * 60
    cut = close_reason(long)
    assert len(cut.encode()) <= 123 and cut.endswith("...")
    assert close_reason("short") == "short"
