"""A thin async wrapper over ``qemu.qmp.QMPClient``: the only module of corral that imports it.

``QmpSession.connect(socket)`` opens one QMP connection to one QEMU; its methods are the
run-time commands the driver uses (``status``, ``cont``, ``stop``, ``system_powerdown``,
``system_reset``, ``quit``, ``version``) and ``events()``, a stream of the lifecycle events
(SHUTDOWN, RESET, STOP, RESUME, POWERDOWN). Several commands may be in flight on one session at
once (QMP matches replies by id), so a slow ``stop`` waiting for SHUTDOWN never blocks an
``inspect`` of the same VM.

Every failure, from qemu.qmp, the socket or a timeout, leaves this module as
``corral.errors.DriverError`` (this is the one translation boundary). QEMU serves one QMP client
at a time: a second client's connect waits for the greeting until the first one leaves, which
``connect`` turns into a DriverError after ``timeout_s`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate

from corral.errors import DriverError

__all__ = ["LIFECYCLE_EVENTS", "EventStream", "QmpEvent", "QmpSession"]

LIFECYCLE_EVENTS: tuple[str, ...] = ("SHUTDOWN", "RESET", "STOP", "RESUME", "POWERDOWN")
"""The events ``QmpSession.events()`` reports by default."""
_COMMAND_TIMEOUT_S = 10.0
# How often a waiting event stream checks that the connection is still up (qemu.qmp does not
# wake listeners when the server hangs up).
_LIVENESS_POLL_S = 0.2


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event: ``name`` (e.g. ``SHUTDOWN``), its ``data`` and QEMU's own timestamp."""

    name: str
    data: Mapping[str, Any]
    timestamp: float


@contextlib.contextmanager
def _translated(label: str, what: str) -> Iterator[None]:
    """Re-raise qemu.qmp, socket and timeout errors as DriverError naming the VM and the step."""
    try:
        yield
    except DriverError:
        raise
    except (QMPError, OSError, EOFError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        raise DriverError(f"qemu {label}: {what} failed: {detail}") from exc


def _event(msg: Mapping[str, object]) -> QmpEvent:
    stamp = msg.get("timestamp")
    seconds = 0.0
    if isinstance(stamp, dict):
        seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    data = msg.get("data")
    return QmpEvent(str(msg["event"]), dict(data) if isinstance(data, dict) else {}, seconds)


class EventStream:
    """Events of one session, from the moment ``QmpSession.events()`` was entered."""

    def __init__(self, session: QmpSession, listener: EventListener) -> None:
        self._session = session
        self._listener = listener

    async def next(self, timeout_s: float) -> QmpEvent | None:
        """The next event, or None after ``timeout_s``. Raises DriverError when the connection
        closes (QEMU exited) before an event arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._listener.empty() and not self._session.connected:
                raise DriverError(f"qemu {self._session.label}: QMP connection closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                msg = await asyncio.wait_for(self._listener.get(), min(remaining, _LIVENESS_POLL_S))
            except TimeoutError:
                continue
            return _event(msg)

    async def __aiter__(self) -> AsyncIterator[QmpEvent]:
        """Every event until the connection closes (then the iteration just ends)."""
        while True:
            try:
                event = await self.next(3600.0)
            except DriverError:
                return
            if event is not None:
                yield event


class QmpSession:
    """One QMP connection to one QEMU process (see the module docstring)."""

    def __init__(self, client: QMPClient, socket_path: Path, label: str) -> None:
        self._client = client
        self.socket_path = socket_path
        self.label = label

    @classmethod
    async def connect(cls, socket_path: Path, *, label: str, timeout_s: float = 5.0) -> QmpSession:
        """Connect and negotiate capabilities; raises DriverError when there is no QEMU
        listening, or no greeting within ``timeout_s`` (another client holds the monitor)."""
        client = QMPClient(label)
        with _translated(label, f"QMP connect to {socket_path}"):
            try:
                await asyncio.wait_for(client.connect(str(socket_path)), timeout_s)
            except TimeoutError:
                raise DriverError(
                    f"qemu {label}: QMP connect to {socket_path} failed: no greeting within "
                    f"{timeout_s:g} s (is another client connected to this QEMU?)"
                ) from None
        return cls(client, socket_path, label)

    @property
    def connected(self) -> bool:
        """True until QEMU hangs up or ``close`` is called."""
        return self._client.runstate == Runstate.RUNNING

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout_s: float = _COMMAND_TIMEOUT_S,
    ) -> object:
        """Run one QMP command and return its ``return`` value; DriverError on any failure,
        including QEMU's own error reply (its class and description are in the message)."""
        with _translated(self.label, command):
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout_s)

    async def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``shutdown``, ``prelaunch``, ..."""
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise DriverError(f"qemu {self.label}: query-status returned {reply!r}")
        return str(reply["status"])

    async def version(self) -> str:
        """``major.minor.micro`` of the QEMU at the other end."""
        reply = await self.execute("query-version")
        try:
            q = reply["qemu"]  # type: ignore[index]
            return f"{int(q['major'])}.{int(q['minor'])}.{int(q['micro'])}"
        except (KeyError, TypeError, ValueError) as exc:
            raise DriverError(f"qemu {self.label}: query-version returned {reply!r}") from exc

    async def cont(self) -> None:
        """Resume the vCPUs (status becomes ``running``)."""
        await self.execute("cont")

    async def stop(self) -> None:
        """Pause the vCPUs (status becomes ``paused``); the process and its memory stay."""
        await self.execute("stop")

    async def system_powerdown(self) -> None:
        """Press the ACPI power button; the guest decides whether and when to power off."""
        await self.execute("system_powerdown")

    async def system_reset(self) -> None:
        """Hard-reset the machine, like its reset button: the guest boots again."""
        await self.execute("system_reset")

    async def quit(self, *, timeout_s: float = 5.0) -> None:
        """Ask QEMU to exit now (no guest shutdown). QEMU may hang up before it replies; that
        counts as success. Raises DriverError only when the command could not be sent."""
        if not self.connected:
            raise DriverError(f"qemu {self.label}: quit failed: QMP connection closed")
        try:
            await self.execute("quit", timeout_s=timeout_s)
        except DriverError:
            if self.connected:
                raise
        await self.close()

    @contextlib.asynccontextmanager
    async def events(self, names: Iterable[str] = LIFECYCLE_EVENTS) -> AsyncIterator[EventStream]:
        """Listen for ``names`` while the block runs; events that arrive before the block is
        entered are not seen, so enter it before sending the command whose events you want."""
        listener = EventListener(tuple(names))
        self._client.register_listener(listener)
        try:
            yield EventStream(self, listener)
        finally:
            self._client.remove_listener(listener)

    async def close(self) -> None:
        """Disconnect (idempotent). QEMU keeps running; errors of a dead connection are
        expected here and dropped."""
        # disconnect() re-raises whatever ended the reader (EOFError when QEMU exited).
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
