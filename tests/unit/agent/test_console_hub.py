"""Sharing one serial socket between several console viewers (QEMU serves one client)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.agent.console import CLOSE_GONE, LocalConsoles, SerialHub
from corral.agent.drivers.fake import FakeDriver
from corral.errors import Conflict, Unavailable


class FakeSerialSocket:
    """A unix socket server standing in for QEMU's serial chardev: it records what each
    client typed and can print to the connected client."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self.typed = bytearray()
        self.writer: asyncio.StreamWriter | None = None
        self.disconnected = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writer = writer
        self.disconnected.clear()
        while data := await reader.read(1024):
            self.typed += data
        self.writer = None
        self.disconnected.set()
        writer.close()

    async def print(self, data: bytes) -> None:
        assert self.writer is not None, "no console client connected"
        self.writer.write(data)
        await self.writer.drain()

    async def hang_up(self) -> None:
        assert self.writer is not None
        self.writer.close()
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def qemu_serial() -> AsyncIterator[FakeSerialSocket]:
    with tempfile.TemporaryDirectory(prefix="cs-", dir="/tmp") as tmp:
        sock = FakeSerialSocket(Path(tmp) / "serial.sock")
        await sock.start()
        yield sock
        assert sock.server is not None
        sock.server.close()


async def until(predicate: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_every_viewer_sees_the_output_and_any_can_type(
    qemu_serial: FakeSerialSocket,
) -> None:
    hub = SerialHub("web-1", qemu_serial.path)
    first = await hub.join()
    second = await hub.join()
    await until(lambda: qemu_serial.writer is not None)
    assert qemu_serial.connections == 1, "one connection to QEMU, shared"

    await qemu_serial.print(b"corral-heartbeat 1\r\n")
    assert await first.recv() == b"corral-heartbeat 1\r\n"
    assert await second.recv() == b"corral-heartbeat 1\r\n"

    await first.send(b"echo a\n")
    await second.send(b"echo b\n")
    await until(lambda: bytes(qemu_serial.typed) == b"echo a\necho b\n")

    # The last viewer out frees QEMU's socket for the next client.
    await first.close()
    assert hub.connected
    await second.close()
    await asyncio.wait_for(qemu_serial.disconnected.wait(), 5)
    assert not hub.connected

    again = await hub.join()
    await until(lambda: qemu_serial.connections == 2)
    await qemu_serial.print(b"after\n")
    assert await again.recv() == b"after\n"
    await again.close()


async def test_viewers_learn_that_the_vm_stopped(qemu_serial: FakeSerialSocket) -> None:
    hub = SerialHub("web-1", qemu_serial.path)
    viewer = await hub.join()
    await until(lambda: qemu_serial.writer is not None)
    await qemu_serial.hang_up()  # QEMU exited
    assert await viewer.recv() is None
    assert viewer.close_code == CLOSE_GONE
    assert "vm web-1's console closed" in viewer.close_reason
    assert not hub.connected


async def test_no_qemu_listening_is_unavailable(tmp_path: Path) -> None:
    hub = SerialHub("web-1", tmp_path / "missing.sock")
    with pytest.raises(Unavailable, match="web-1's serial console did not answer"):
        await hub.join()


async def test_the_fake_driver_has_no_consoles(tmp_path: Path) -> None:
    consoles = LocalConsoles(FakeDriver(tmp_path), "n1")
    with pytest.raises(Conflict, match="fake driver, which has no serial console"):
        await consoles.open("web-1", "id-1", "serial")
