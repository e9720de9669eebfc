"""Freezing a running guest's disk under a new overlay (linked clones' bases), in the driver."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from corral.agent.drivers.qemu.layers import FrozenDisk, freeze
from corral.errors import Conflict

from .conftest import DriverFactory
from .test_snapshots_driver_qemu import boot, console_of, qemu_io, run

pytestmark = pytest.mark.timeout(300)


def backing_of(path: Path) -> str | None:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True
    ).stdout
    return json.loads(out).get("backing-filename")  # type: ignore[no-any-return]


def tags_of(path: Path) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True
    ).stdout
    return [s["name"] for s in json.loads(out).get("snapshots") or []]


def mode_of(path: Path) -> int:
    return os.stat(path).st_mode


async def test_a_running_guest_moves_onto_an_overlay_and_everything_works_on_top(
    drivers: DriverFactory, scratch: Path
) -> None:
    driver, data = await boot(drivers, scratch, "lay")
    console = console_of(driver, "lay")
    await console.wait_booted(timeout_s=90)
    assert await console.command("write-pattern /dev/vda 0x11 1") == "pattern written"
    pid = (await driver.inspect("lay")).extra["qemu.pid"]  # type: ignore[union-attr]

    top = scratch / "lay-data-top1.qcow2"
    assert await freeze(driver, "lay", [FrozenDisk(base=data, top=top)]) == "running"
    vm = await driver.inspect("lay")
    assert vm is not None and vm.state == "running" and vm.extra["qemu.pid"] == pid
    assert vm.disks[0].path == str(top)
    assert backing_of(top) == str(data)
    assert not mode_of(data) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)

    # The guest writes to the overlay only; the base keeps the old data.
    assert await console.command("write-pattern /dev/vda 0x22 1") == "pattern written"
    assert "read 1048576/1048576" in qemu_io(data, "read -P 0x11 0 1M")
    assert "read 1048576/1048576" in qemu_io(top, "read -P 0x22 0 1M")

    # Snapshots, resizing and the file of a restarted QEMU follow the new top.
    taken = await driver.snapshot_create("lay", "on-top", memory=True)
    assert taken.with_memory and "on-top" in tags_of(top) and "on-top" not in tags_of(data)
    assert await driver.resize_disk("lay", "lay-data", 32 * 1024 * 1024)
    await driver.stop("lay", timeout_s=20)
    await driver.start("lay")
    mark = console.mark()
    await console.wait_booted(since=mark, timeout_s=90)
    assert await console.command("read-pattern /dev/vda 0x22 1") == "pattern ok"

    # Frozen again under the new QEMU, the disk still unplugs cleanly (the whole chain goes).
    top2 = scratch / "lay-data-top2.qcow2"
    assert await freeze(driver, "lay", [FrozenDisk(base=top, top=top2)]) == "running"
    assert backing_of(top2) == str(top)
    vm = await driver.detach_disk("lay", "lay-data")
    assert [d.id for d in vm.disks] == ["lay-root"]


async def test_a_failed_switch_leaves_the_vm_on_its_disk_and_no_overlay(
    drivers: DriverFactory, scratch: Path
) -> None:
    driver, data = await boot(drivers, scratch, "nolay")
    elsewhere = scratch / "not-a-disk-of-the-vm.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(elsewhere), "16M")
    top = scratch / "nolay-top.qcow2"
    with pytest.raises(Conflict, match="does not use"):
        await freeze(driver, "nolay", [FrozenDisk(base=elsewhere, top=top)])
    assert not top.exists()
    assert mode_of(elsewhere) & stat.S_IWUSR
    vm = await driver.inspect("nolay")
    assert vm is not None and str(data) in [d.path for d in vm.disks]
