"""This host's side of interactive consoles: byte channels to a local VM's serial port and VNC.

QEMU's serial chardev socket serves one client at a time, so every viewer of one VM shares a
single connection (``SerialHub``): what the guest prints goes to every viewer, what any viewer
types goes to the guest. The connection is made for the first viewer and closed after the last
one leaves, so the socket is free again for anything else (e.g. tests typing on it directly).
VNC needs no sharing (QEMU takes several VNC clients): each viewer gets its own TCP connection.

A channel (``SerialViewer``, ``TcpChannel``) is what the API pumps a WebSocket into:
``recv()`` returns the next bytes, or None once closed (``close_code`` and ``close_reason`` then
say why, as WebSocket close codes); ``send()`` writes; ``close()`` is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from corral.agent.drivers import Driver, QemuDriver
from corral.errors import Conflict, DriverError, NotFound, Unavailable

__all__ = [
    "CLOSE_GONE",
    "CLOSE_NORMAL",
    "CLOSE_TOO_SLOW",
    "LocalConsoles",
    "SerialHub",
    "SerialViewer",
    "TcpChannel",
]

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GONE = 1001  # "going away": the VM's console ended (the VM stopped or was deleted)
CLOSE_TOO_SLOW = 1013  # "try again later": a viewer fell too far behind the output
_CHUNK = 64 * 1024
_MAX_BEHIND_BYTES = 4 * 1024 * 1024
_CONNECT_TIMEOUT_S = 5.0
_DRAIN_TIMEOUT_S = 2.0


@dataclass(eq=False)
class SerialViewer:
    """One viewer of a shared serial console (a channel; see the module docstring)."""

    hub: SerialHub
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    behind: int = 0
    close_code: int = CLOSE_NORMAL
    close_reason: str = ""
    closed: bool = False

    def _deliver(self, data: bytes) -> None:
        if self.closed:
            return
        if self.behind + len(data) > _MAX_BEHIND_BYTES:
            self._end(CLOSE_TOO_SLOW, "this viewer fell over 4 MiB behind the console output")
            return
        self.behind += len(data)
        self.queue.put_nowait(data)

    def _end(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_code, self.close_reason = code, reason
            self.queue.put_nowait(None)

    async def recv(self) -> bytes | None:
        data = await self.queue.get()
        if data is None:
            self.queue.put_nowait(None)  # later calls see the end too
            return None
        self.behind -= len(data)
        return data

    async def send(self, data: bytes) -> None:
        if not self.closed:
            await self.hub.write(data)

    async def close(self) -> None:
        self._end(CLOSE_NORMAL, "")
        await self.hub.leave(self)


class SerialHub:
    """The one connection to a VM's serial socket, shared by every viewer of that VM."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.viewers: set[SerialViewer] = set()
        self._lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def join(self) -> SerialViewer:
        """A new viewer; connects to the socket for the first one. Unavailable if QEMU does
        not answer on it."""
        async with self._lock:
            if self._writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_unix_connection(str(self.path)), _CONNECT_TIMEOUT_S
                    )
                except (OSError, TimeoutError) as exc:
                    raise Unavailable(
                        f"vm {self.name}'s serial console did not answer ({exc}); is it running?"
                    ) from exc
                self._writer = writer
                self._reader_task = asyncio.create_task(
                    self._pump(reader, writer), name=f"serial-{self.name}"
                )
            viewer = SerialViewer(self)
            self.viewers.add(viewer)
            return viewer

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Deliver what the guest prints until QEMU closes this connection."""
        try:
            while data := await reader.read(_CHUNK):
                if self._writer is writer:  # a connection being let go has no viewers
                    for viewer in list(self.viewers):
                        viewer._deliver(data)
        except OSError as exc:
            log.info("vm %s: serial console connection failed: %s", self.name, exc)
        async with self._lock:
            if self._writer is writer:
                # End of file while in use: QEMU exited (stop, delete, crash).
                for viewer in list(self.viewers):
                    viewer._end(CLOSE_GONE, f"vm {self.name}'s console closed: the VM stopped")
                self.viewers.clear()
                self._writer, self._reader_task = None, None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            writer.write(data)
            await writer.drain()
        except OSError as exc:
            log.info("vm %s: cannot type on the serial console: %s", self.name, exc)

    async def leave(self, viewer: SerialViewer) -> None:
        """Drop a viewer; the last one out lets the connection go (QEMU then takes another)."""
        async with self._lock:
            self.viewers.discard(viewer)
            if self.viewers:
                return
            # Detached under the lock: a viewer joining now gets a connection of its own.
            writer, task = self._detach()
        await _let_go(writer, task)

    async def let_go(self) -> None:
        """Close the connection (the agent stops); see ``_let_go``."""
        async with self._lock:
            writer, task = self._detach()
        await _let_go(writer, task)

    def _detach(self) -> tuple[asyncio.StreamWriter | None, asyncio.Task[None] | None]:
        writer, task = self._writer, self._reader_task
        self._writer, self._reader_task = None, None
        return writer, task


async def _let_go(writer: asyncio.StreamWriter | None, task: asyncio.Task[None] | None) -> None:
    """Close a serial connection without losing what was typed last.

    QEMU feeds the guest's UART a few bytes at a time and drops whatever it had not read when
    the client hangs up. So the connection is half-closed: QEMU reads the rest, sees end of
    file and closes its side, which ends the pump. A guest that takes no input (stopped CPUs)
    is given ``_DRAIN_TIMEOUT_S``.
    """
    if writer is None:
        return
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
    if task is not None:
        try:
            await asyncio.wait_for(asyncio.shield(task), _DRAIN_TIMEOUT_S)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class TcpChannel:
    """A channel over one TCP connection (a VM's VNC server on 127.0.0.1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""

    @classmethod
    async def open(cls, host: str, port: int, what: str) -> TcpChannel:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"{what} did not answer on {host}:{port} ({exc})") from exc
        return cls(reader, writer)

    async def recv(self) -> bytes | None:
        try:
            data = await self._reader.read(_CHUNK)
        except OSError as exc:
            data = b""
            self.close_reason = f"the connection failed: {exc}"
        if not data:
            self.close_code = CLOSE_GONE
            self.close_reason = self.close_reason or "the VM's VNC server closed the connection"
            return None
        return data

    async def send(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError:
            pass  # recv() reports the end

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


ConsoleKindName = Literal["serial", "vnc"]


class LocalConsoles:
    """Opens console channels to the VMs this host runs (one ``SerialHub`` per VM)."""

    def __init__(self, driver: Driver, node: str) -> None:
        self.driver = driver
        self.node = node
        self._hubs: dict[str, SerialHub] = {}

    async def open(self, name: str, vm_id: str, kind: ConsoleKindName) -> SerialViewer | TcpChannel:
        """A channel to the ``kind`` console of VM ``name`` (whose id must be ``vm_id``).

        Raises NotFound (not defined here), Conflict (no such console with this driver, another
        VM of that name, or not running) or Unavailable (QEMU does not answer)."""
        driver = self.driver
        if not isinstance(driver, QemuDriver):
            raise Conflict(
                f"vm {name} runs on host {self.node} with the {driver.name} driver, which has no "
                f"{kind} console (only the qemu driver has consoles)"
            )
        vm = await driver.inspect(name)
        if vm is None:
            raise NotFound(f"vm {name} is not defined on host {self.node}")
        if vm.vm_id != vm_id:
            raise Conflict(
                f"vm {name} on host {self.node} is another VM than the ticket was issued for "
                "(deleted and created again?); get a new ticket"
            )
        if vm.state not in ("running", "paused"):
            raise Conflict(
                f"vm {name} is {vm.state}, so its {kind} console is closed; start it first "
                f"(corral vm start {name}); `corral vm log {name}` shows its past output"
            )
        try:
            if kind == "vnc":
                return await TcpChannel.open("127.0.0.1", driver.vnc_port(name), f"vm {name}'s VNC")
            path = driver.console_socket_path(name)
        except DriverError as exc:
            raise NotFound(str(exc)) from exc
        hub = self._hubs.get(name)
        if hub is None or hub.path != path:
            hub = self._hubs[name] = SerialHub(name, path)
        return await hub.join()

    async def close(self) -> None:
        """Close every shared serial connection (the agent stops)."""
        for hub in list(self._hubs.values()):
            for viewer in list(hub.viewers):
                viewer._end(CLOSE_GONE, "the corral agent on this host is stopping")
            hub.viewers.clear()
            await hub.let_go()
        self._hubs.clear()
