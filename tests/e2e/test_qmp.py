"""The QMP wrapper against a real, empty QEMU (no guest: ``-S`` keeps it in prelaunch)."""

from __future__ import annotations

import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.agent.drivers.qemu.cmdline import opt_value
from corral.agent.drivers.qemu.process import (
    is_vm_process,
    launch,
    qemu_version,
    signal_vm,
    wait_exit,
)
from corral.agent.drivers.qemu.qmp import QmpSession
from corral.errors import DriverError

pytestmark = pytest.mark.timeout(60)


@dataclass
class BareQemu:
    pid: int
    uuid: str
    qmp_socket: Path


@pytest.fixture
async def bare_qemu(scratch: Path) -> AsyncIterator[BareQemu]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/host-deps.sh", pytrace=False)
    marker = str(uuid.uuid4())
    sock = scratch / "qmp.sock"
    argv = [
        "qemu-system-x86_64",
        *("-nodefaults", "-no-user-config", "-display", "none", "-uuid", marker, "-S"),
        *("-machine", "type=q35", "-accel", "tcg", "-m", "size=64M"),
        *("-chardev", f"socket,id=qmp,path={opt_value(str(sock))},server=on,wait=off"),
        *("-mon", "chardev=qmp,mode=control"),
        *("-pidfile", str(scratch / "qemu.pid"), "-daemonize"),
    ]
    pid = await launch(argv, pidfile=scratch / "qemu.pid", log=scratch / "qemu.log", label="bare")
    try:
        yield BareQemu(pid, marker, sock)
    finally:
        signal_vm(pid, marker, signal.SIGKILL)
        await wait_exit(pid, marker, 5.0)


async def test_status_version_and_run_control(bare_qemu: BareQemu) -> None:
    session = await QmpSession.connect(bare_qemu.qmp_socket, label="bare")
    try:
        assert session.connected
        assert await session.status() == "prelaunch"
        assert await session.version() == await qemu_version("qemu-system-x86_64")
        await session.cont()
        assert await session.status() == "running"
        await session.stop()
        assert await session.status() == "paused"
    finally:
        await session.close()
    assert not session.connected


async def test_lifecycle_events_arrive_in_order(bare_qemu: BareQemu) -> None:
    session = await QmpSession.connect(bare_qemu.qmp_socket, label="bare")
    try:
        async with session.events() as events:
            await session.cont()
            await session.system_reset()
            await session.system_powerdown()
            await session.stop()
            seen = []
            while (event := await events.next(2.0)) is not None:
                seen.append(event.name)
                if event.name == "STOP":
                    break
        assert seen == ["RESUME", "RESET", "POWERDOWN", "STOP"]
        assert event is not None and event.timestamp > 0
    finally:
        await session.close()


async def test_qemu_errors_become_driver_errors(bare_qemu: BareQemu, scratch: Path) -> None:
    with pytest.raises(DriverError, match=r"QMP connect to .*nowhere\.sock failed"):
        await QmpSession.connect(scratch / "nowhere.sock", label="bare")
    session = await QmpSession.connect(bare_qemu.qmp_socket, label="bare")
    try:
        with pytest.raises(DriverError, match=r"qemu bare: no-such-command failed: .*not"):
            await session.execute("no-such-command")
        # QEMU serves one QMP client at a time: a second one is told so, not left hanging.
        with pytest.raises(DriverError, match="no greeting within 1 s"):
            await QmpSession.connect(bare_qemu.qmp_socket, label="bare", timeout_s=1.0)
        assert await session.status() == "prelaunch"  # the first session is unharmed
    finally:
        await session.close()


async def test_quit_ends_qemu_and_a_waiting_event_stream_notices(bare_qemu: BareQemu) -> None:
    session = await QmpSession.connect(bare_qemu.qmp_socket, label="bare")
    async with session.events(("SHUTDOWN",)) as events:
        await session.quit()
        assert not session.connected
        with pytest.raises(DriverError, match="QMP connection closed"):
            while await events.next(2.0) is not None:
                pass
    assert await wait_exit(bare_qemu.pid, bare_qemu.uuid, 5.0)
    assert not is_vm_process(bare_qemu.pid, bare_qemu.uuid)
    with pytest.raises(DriverError, match="query-status failed"):
        await session.status()
