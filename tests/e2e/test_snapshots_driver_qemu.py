"""Snapshots and disk copies in the QEMU driver, against a real guest under TCG."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.qemu import DiskConfig, QemuDriver
from corral.errors import Conflict, ValidationFailed
from corral.model import VmSpec
from corral.model.vm import VmNic

from .conftest import DriverFactory
from .console import GuestConsole

pytestmark = pytest.mark.timeout(300)


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return out.decode()


def qemu_io(path: Path, command: str) -> str:
    import subprocess

    shared = ["-r", "-U"] if command.startswith("read") else []  # -U beside a QEMU: read-only
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", *shared, "-c", command, str(path)],
        capture_output=True,
        text=True,
    ).stdout


async def boot(drivers: DriverFactory, scratch: Path, name: str) -> tuple[QemuDriver, Path]:
    root = scratch / f"{name}.qcow2"
    tiny = str(drivers.image.disk.path)
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", tiny, "-F", "qcow2", str(root))
    data = scratch / f"{name}-data.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(data), "16M")
    driver = drivers()
    spec = VmSpec(memory_mib=128, nics=[VmNic(mac="52:54:00:aa:bb:01")])
    vm = DriverVm(name=name, vm_id=f"id-{name}", epoch=1, spec=spec, state="stopped")
    await driver.define(
        vm,
        disks=[
            DiskConfig(path=data, format="qcow2", id=f"{name}-data"),
            DiskConfig(path=root, format="qcow2", id=f"{name}-root"),
        ],
    )
    await driver.start(name)
    return driver, data


def console_of(driver: QemuDriver, name: str) -> GuestConsole:
    return GuestConsole(driver.console_log_path(name), driver.console_socket_path(name))


async def test_memory_snapshot_rollback_restores_disk_and_the_guest_counter(
    drivers: DriverFactory, scratch: Path
) -> None:
    driver, data = await boot(drivers, scratch, "snap")
    argv = await driver.command_line("snap")
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:01,id=nic0" in argv
    console = console_of(driver, "snap")
    await console.wait_booted(timeout_s=90)
    assert await console.command("write-pattern /dev/vda 0x11 1") == "pattern written"
    await console.wait_for(lambda lines: len(console.heartbeats()) >= 3, timeout_s=30)

    result = await driver.snapshot_create("snap", "before", memory=None)
    assert result.with_memory and result.vm_state == "running" and result.vm_state_bytes > 0
    at_snapshot = max(console.heartbeats())
    with pytest.raises(Conflict):
        await driver.snapshot_create("snap", "before", memory=False)

    assert await console.command("write-pattern /dev/vda 0x22 1") == "pattern written"
    await console.wait_for(lambda lines: max(console.heartbeats()) >= at_snapshot + 3, timeout_s=30)
    mark = console.mark()
    back = await driver.snapshot_rollback("snap", "before", with_memory=True, disks=["snap-data"])
    assert back.with_memory and back.vm_state == "running"
    # The guest runs on from the counter it had when the snapshot was taken.
    # The counter drops back to where it was at the snapshot and counts on from there.
    await console.wait_for(
        lambda lines: any(n <= at_snapshot + 1 for n in console.heartbeats(mark)), timeout_s=30
    )
    assert await console.command("read-pattern /dev/vda 0x11 1") == "pattern ok"
    assert (await driver.inspect("snap")).state == "running"  # type: ignore[union-attr]

    # Disk only while running, then delete both; a disk-only rollback needs the VM stopped.
    disk_only = await driver.snapshot_create("snap", "disk-only", memory=False)
    assert not disk_only.with_memory
    with pytest.raises(Conflict, match="stop it first"):
        await driver.snapshot_rollback("snap", "disk-only", with_memory=False, disks=["snap-data"])
    await driver.snapshot_delete("snap", "before")
    await driver.stop("snap", force=True)
    with pytest.raises(ValidationFailed):
        await driver.snapshot_create("snap", "nomem", memory=True)
    assert "read 1048576/1048576" in qemu_io(data, "read -P 0x11 0 1M")  # rolled back content
    assert "wrote" in qemu_io(data, "write -P 0x33 0 1M")
    await driver.snapshot_rollback("snap", "disk-only", with_memory=False, disks=["snap-data"])
    assert "read 1048576/1048576" in qemu_io(data, "read -P 0x11 0 1M")
    assert (await driver.snapshot_delete("snap", "disk-only")).disks
    assert (await driver.snapshot_delete("snap", "disk-only")).disks == {}
    info = await run("qemu-img", "snapshot", "-l", "-U", str(data))
    assert "disk-only" not in info and "before" not in info


async def test_full_copy_of_a_running_vm_is_of_one_instant_and_independent(
    drivers: DriverFactory, scratch: Path
) -> None:
    driver, data = await boot(drivers, scratch, "src")
    console = console_of(driver, "src")
    await console.wait_booted(timeout_s=90)
    assert await console.command("write-pattern /dev/vda 0x44 1") == "pattern written"
    copy = scratch / "copy.qcow2"
    await driver.copy_disk("src", data, copy, linked=False, size_gib=None)
    assert (await driver.inspect("src")).state == "running"  # type: ignore[union-attr]
    assert "read 1048576/1048576" in qemu_io(copy, "read -P 0x44 0 1M")
    assert "corral-copy" not in await run("qemu-img", "snapshot", "-l", "-U", str(data))
    assert "wrote" in qemu_io(copy, "write -P 0x55 0 1M")
    assert await console.command("read-pattern /dev/vda 0x44 1") == "pattern ok"
