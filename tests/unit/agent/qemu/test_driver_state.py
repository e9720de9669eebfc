"""The QEMU driver's bookkeeping without booting anything: define, handles on disk, validation,
process recognition. (Booting real guests is tests/e2e.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.qemu import DirectKernelBoot, DiskConfig, QemuDriver
from corral.agent.drivers.qemu.handle import HANDLE_FILE, VMS_DIR
from corral.agent.drivers.qemu.process import is_vm_process, signal_vm, wait_exit
from corral.errors import DriverError
from corral.model import VmSpec


def new_vm(name: str = "web-1", vm_id: str = "id-1") -> DriverVm:
    return DriverVm(
        name=name, vm_id=vm_id, epoch=2, spec=VmSpec(vcpus=2, memory_mib=256), state="stopped"
    )


@pytest.fixture
def boot(tmp_path: Path) -> DirectKernelBoot:
    (tmp_path / "vmlinux").write_bytes(b"k")
    return DirectKernelBoot(kernel=tmp_path / "vmlinux", cmdline="console=ttyS0")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def driver(state_dir: Path, boot: DirectKernelBoot) -> AsyncIterator[QemuDriver]:
    drv = QemuDriver(state_dir, accel="tcg", boot=boot)
    yield drv
    await drv.close()


def handle_doc(state_dir: Path, name: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads((state_dir / VMS_DIR / name / HANDLE_FILE).read_text())
    return doc


async def test_define_persists_a_stopped_vm_with_its_boot_disks_and_vnc_display(
    driver: QemuDriver, state_dir: Path, boot: DirectKernelBoot, tmp_path: Path
) -> None:
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"")
    vm = await driver.define(new_vm(), disks=[DiskConfig(path=disk, format="qcow2")])
    assert (vm.state, vm.started_at, vm.epoch, vm.spec) == ("stopped", None, 2, new_vm().spec)
    port = driver.vnc_port("web-1")
    assert 5900 <= port < 6900
    assert vm.extra["qemu.vnc"] == f"127.0.0.1:{port}"
    assert driver.console_log_path("web-1") == state_dir / VMS_DIR / "web-1" / "console.log"
    assert driver.console_socket_path("web-1").name == "serial.sock"
    doc = handle_doc(state_dir, "web-1")
    assert doc["boot"] == {"kernel": str(boot.kernel), "initrd": None, "cmdline": "console=ttyS0"}
    assert doc["disks"] == [
        {"path": str(disk), "format": "qcow2", "read_only": False, "id": "", "slot": 0}
    ]
    assert doc["power"] == "stopped" and doc["pid"] is None
    uuid.UUID(str(doc["uuid"]))
    # No temporary files are left next to the handle.
    assert sorted(p.name for p in (state_dir / VMS_DIR / "web-1").iterdir()) == [HANDLE_FILE]


async def test_define_is_idempotent_per_vm_id_and_refuses_another_id(driver: QemuDriver) -> None:
    first = await driver.define(new_vm())
    again = await driver.define(replace(new_vm(), epoch=9))
    assert again.epoch == first.epoch == 2
    with pytest.raises(DriverError, match="already defined with id id-1"):
        await driver.define(new_vm(vm_id="id-other"))


async def test_each_vm_gets_its_own_vnc_display(driver: QemuDriver) -> None:
    for i in range(3):
        await driver.define(new_vm(f"vm-{i}", f"id-{i}"))
    ports = {driver.vnc_port(f"vm-{i}") for i in range(3)}
    assert len(ports) == 3


@pytest.mark.parametrize("name", ["web,file=/etc/passwd", "../escape", "Upper", ""])
async def test_define_refuses_names_that_are_no_dns_label(driver: QemuDriver, name: str) -> None:
    with pytest.raises(DriverError, match="must be a DNS label"):
        await driver.define(new_vm(name))
    assert await driver.list() == []


async def test_define_validates_boot_and_disks_before_anything_is_written(
    driver: QemuDriver, state_dir: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    gone.write_bytes(b"k")
    boot = DirectKernelBoot(kernel=gone)
    gone.unlink()
    with pytest.raises(DriverError, match=r"vm web-1: boot\.kernel: .* not an existing file"):
        await driver.define(new_vm(), boot=boot)
    assert not (state_dir / VMS_DIR / "web-1").exists()
    assert await driver.inspect("web-1") is None


async def test_define_without_any_boot_source_says_so(state_dir: Path) -> None:
    driver = QemuDriver(state_dir, accel="tcg")
    with pytest.raises(DriverError, match="no boot source"):
        await driver.define(new_vm())


async def test_a_state_dir_too_deep_for_unix_sockets_is_refused_at_define(
    tmp_path: Path, boot: DirectKernelBoot
) -> None:
    driver = QemuDriver(tmp_path / ("d" * 90), accel="tcg", boot=boot)
    with pytest.raises(DriverError, match=r"run_dir: socket path .* longer than 107 bytes"):
        await driver.define(new_vm())


async def test_update_stores_agent_fields_but_not_the_drivers_own_extra_keys(
    driver: QemuDriver, state_dir: Path
) -> None:
    vm = await driver.define(new_vm())
    changed = replace(
        vm,
        epoch=3,
        spec=VmSpec(vcpus=4, memory_mib=512),
        applied_generation=7,
        reboot_generation=2,
        message="hardware change pending",
        extra={**vm.extra, "team": "web"},
    )
    after = await driver.update("web-1", changed)
    assert (after.epoch, after.applied_generation, after.reboot_generation) == (3, 7, 2)
    assert after.spec == VmSpec(vcpus=4, memory_mib=512)
    assert after.message == "hardware change pending"
    assert after.extra["team"] == "web"
    assert handle_doc(state_dir, "web-1")["extra"] == {"team": "web"}
    with pytest.raises(DriverError, match="has id id-1, not id-x"):
        await driver.update("web-1", replace(changed, vm_id="id-x"))


async def test_a_new_driver_over_the_same_state_dir_sees_the_same_vms(
    driver: QemuDriver, state_dir: Path, boot: DirectKernelBoot
) -> None:
    await driver.define(new_vm("a", "id-a"))
    await driver.define(new_vm("b", "id-b"))
    port = driver.vnc_port("b")
    restarted = QemuDriver(state_dir, accel="tcg", boot=boot)
    assert [(vm.name, vm.vm_id, vm.state) for vm in await restarted.recover()] == [
        ("a", "id-a", "stopped"),
        ("b", "id-b", "stopped"),
    ]
    assert restarted.vnc_port("b") == port


async def test_destroy_removes_the_vm_directory_and_is_idempotent(
    driver: QemuDriver, state_dir: Path
) -> None:
    await driver.define(new_vm())
    await driver.destroy("web-1")
    await driver.destroy("web-1")
    assert not (state_dir / VMS_DIR / "web-1").exists()
    assert await driver.inspect("web-1") is None


async def test_operations_on_an_undefined_vm_fail_clearly(driver: QemuDriver) -> None:
    for call in (driver.start, driver.reboot, driver.pause, driver.resume, driver.stop):
        with pytest.raises(DriverError, match="vm nope is not defined on this host"):
            await call("nope")
    with pytest.raises(DriverError, match="not defined"):
        driver.vnc_port("nope")


async def test_stopped_vm_cannot_be_rebooted_paused_or_resumed(driver: QemuDriver) -> None:
    await driver.define(new_vm())
    with pytest.raises(DriverError, match="cannot reboot vm web-1: it is stopped"):
        await driver.reboot("web-1")
    with pytest.raises(DriverError, match="cannot pause vm web-1: it is stopped"):
        await driver.pause("web-1")
    with pytest.raises(DriverError, match="cannot resume vm web-1: it is stopped"):
        await driver.resume("web-1")
    assert (await driver.stop("web-1")).state == "stopped"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "corrupt handle file"),
        ('{"version": 99}', "unsupported format version 99"),
        ('{"version": 1, "name": "web-1"}', "corrupt handle file"),
    ],
)
async def test_a_corrupt_handle_is_reported_naming_the_file(
    driver: QemuDriver, state_dir: Path, boot: DirectKernelBoot, content: str, problem: str
) -> None:
    await driver.define(new_vm())
    path = state_dir / VMS_DIR / "web-1" / HANDLE_FILE
    path.write_text(content)
    with pytest.raises(DriverError, match=problem) as err:
        QemuDriver(state_dir, accel="tcg", boot=boot)
    assert str(path) in str(err.value)


def test_an_unknown_accelerator_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="accel must be auto, kvm or tcg"):
        QemuDriver(tmp_path, accel="xen")  # type: ignore[arg-type]


async def test_processes_are_recognised_by_pid_and_uuid_and_only_then_signalled() -> None:
    marker = str(uuid.uuid4())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", "-uuid", marker
    )
    try:
        assert is_vm_process(proc.pid, marker)
        # Another VM's uuid, or our own process: a reused pid is never taken for the VM.
        assert not is_vm_process(proc.pid, str(uuid.uuid4()))
        assert not is_vm_process(os.getpid(), marker)
        assert not is_vm_process(None, marker)
        assert not signal_vm(proc.pid, str(uuid.uuid4()), signal.SIGKILL)
        assert not await wait_exit(proc.pid, marker, 0.2)
        assert signal_vm(proc.pid, marker, signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        assert not is_vm_process(proc.pid, marker)
        assert await wait_exit(proc.pid, marker, 0.2)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
