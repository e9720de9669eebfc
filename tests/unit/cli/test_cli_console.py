"""`corral vm console`'s session against a local WebSocket server standing in for the API:
pipe mode sends stdin and prints the answers, and a server's close code becomes the exit code."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from corral.cli.console import ConsoleEnd, _run


async def guest(ws: ServerConnection) -> None:
    """Answers `echo X` lines like the test guest; `refuse` closes like a fake-driver VM."""
    if ws.request is not None and "refuse" in ws.request.path:
        await ws.close(4409, "vm fk runs on host n1 with the fake driver, which has no console")
        return
    await ws.send(b"corral-heartbeat 1\r\n")
    async for message in ws:
        assert isinstance(message, bytes)
        for line in message.decode().splitlines():
            if line.startswith("echo "):
                await ws.send(line.removeprefix("echo ").encode() + b"\r\n")
            if line == "poweroff":
                await ws.close(1001, "vm fk's console closed: the VM stopped")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async with serve(guest, "127.0.0.1", 0) as srv:
        yield _url(srv)


def _url(srv: Server) -> str:
    host, port = next(iter(srv.sockets)).getsockname()[:2]
    return f"ws://{host}:{port}/api/v1/vms/fk/console?ticket=t"


async def session(url: str, stdin: bytes, **kw: float) -> tuple[ConsoleEnd, bytes]:
    read, write = os.pipe()
    os.write(write, stdin)
    os.close(write)
    out = io.BytesIO()
    try:
        end = await _run(
            url,
            read,
            out,
            interactive=False,
            linger=kw.get("linger", 0.5),
            timeout=kw.get("timeout"),
            hello=lambda: None,
        )
    finally:
        os.close(read)
    return end, out.getvalue()


async def test_pipe_mode_sends_stdin_and_prints_the_answers(server: str) -> None:
    end, printed = await session(server, b"echo one\necho two\n")
    assert end == ConsoleEnd(0, "")
    assert b"corral-heartbeat 1\r\none\r\ntwo\r\n" in printed


async def test_the_console_ending_is_reported(server: str) -> None:
    end, _ = await session(server, b"poweroff\n", linger=5)
    assert end == ConsoleEnd(0, "console closed: vm fk's console closed: the VM stopped")


async def test_a_refused_console_exits_with_its_code(server: str) -> None:
    end, _ = await session(server.replace("/console", "/refuse"), b"")
    assert end.exit_code == 4
    assert end.message.startswith("console unavailable: vm fk runs on host n1 with the fake")


async def test_an_unreachable_server_is_exit_5() -> None:
    end, _ = await session("ws://127.0.0.1:1/api/v1/vms/fk/console?ticket=t", b"")
    assert end.exit_code == 5
    assert end.message.startswith("cannot open the console at ws://127.0.0.1:1/api/v1/vms/fk")
    assert "ticket" not in end.message, "the ticket is not printed"
