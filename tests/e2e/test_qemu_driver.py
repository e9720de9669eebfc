"""The QEMU driver against real QEMU under TCG, booting the test guest (guest/README.md)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

import pytest

from corral.agent.drivers.base import DriverDisk, DriverVm
from corral.agent.drivers.qemu import GUEST_POWERED_OFF, DirectKernelBoot, DiskConfig, QemuDriver
from corral.model import VmSpec

from .conftest import DriverFactory
from .console import BOOTED, GuestConsole

pytestmark = pytest.mark.timeout(240)

AGENT = Path(__file__).with_name("agent_process.py")


def new_vm(name: str) -> DriverVm:
    return DriverVm(
        name=name, vm_id=f"id-{name}", epoch=1, spec=VmSpec(memory_mib=256), state="stopped"
    )


def console_of(driver: QemuDriver, name: str) -> GuestConsole:
    return GuestConsole(driver.console_log_path(name), driver.console_socket_path(name))


def qemu_running(pid: int) -> bool:
    """Whether ``pid`` is a live QEMU (a zombie's command line is empty)."""
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def pid_of(vm: DriverVm) -> int:
    return int(vm.extra["qemu.pid"])


async def inspect(driver: QemuDriver, name: str) -> DriverVm:
    vm = await driver.inspect(name)
    assert vm is not None
    return vm


async def wait_state(driver: QemuDriver, name: str, state: str, timeout_s: float) -> DriverVm:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (vm := await inspect(driver, name)).state != state:
        assert loop.time() < deadline, f"vm {name} is {vm.state} ({vm.message}), not {state}"
        await asyncio.sleep(0.1)
    return vm


def heartbeats_after_boot(console: GuestConsole, since: int) -> list[int]:
    lines = console.lines(since)
    assert BOOTED in lines, lines[-10:]
    rest = lines[lines.index(BOOTED) + 1 :]
    return [int(x.split()[1]) for x in rest if x.startswith("corral-heartbeat ")]


async def test_guest_boots_heartbeats_pauses_resumes_reboots_and_powers_off(
    drivers: DriverFactory,
) -> None:
    driver = drivers()
    await driver.define(new_vm("life"))
    started = await driver.start("life")
    assert started.state == "running" and started.started_at is not None
    pid = pid_of(started)
    assert qemu_running(pid)
    assert (await driver.start("life")).started_at == started.started_at  # idempotent
    console = console_of(driver, "life")
    await console.wait_booted()
    assert (await console.wait_heartbeat(3))[:3] == [1, 2, 3]
    assert await console.command("echo hello corral", expect="hello corral") == "hello corral"

    paused = await driver.pause("life")
    assert paused.state == "paused" and paused.started_at == started.started_at
    await asyncio.sleep(0.3)
    frozen = console.heartbeats()
    await asyncio.sleep(2.5)
    assert console.heartbeats() == frozen, "the counter advanced while the VM was paused"
    assert (await inspect(driver, "life")).state == "paused"

    assert (await driver.resume("life")).state == "running"
    beats = await console.wait_heartbeat(frozen[-1] + 2, timeout_s=15)
    # It continued where it stopped: one run of consecutive numbers, never restarted.
    assert beats == list(range(1, len(beats) + 1))
    assert console.lines().count(BOOTED) == 1

    mark = console.mark()
    rebooted = await driver.reboot("life")
    assert rebooted.state == "running"
    assert rebooted.started_at is not None and rebooted.started_at > started.started_at
    assert pid_of(rebooted) == pid  # the same QEMU: the guest itself booted again
    await console.wait_booted(since=mark)
    await console.wait_heartbeat(2, since=mark)
    assert heartbeats_after_boot(console, mark)[:2] == [1, 2]

    stopped = await driver.stop("life", timeout_s=30)
    assert (stopped.state, stopped.message, stopped.started_at) == ("stopped", "", None)
    assert not qemu_running(pid)
    assert "corral-guest: power button, powering off" in console.lines(mark)
    assert (await inspect(driver, "life")).state == "stopped"


async def test_force_stop_outside_kill_is_crashed_and_a_crashed_vm_starts_again(
    drivers: DriverFactory,
) -> None:
    driver = drivers()
    await driver.define(new_vm("victim"))
    first = pid_of(await driver.start("victim"))
    forced = await driver.stop("victim", force=True)
    assert forced.state == "stopped"
    assert not qemu_running(first)

    second = pid_of(await driver.start("victim"))
    assert second != first and qemu_running(second)
    os.kill(second, signal.SIGKILL)  # not the driver: someone else killed QEMU
    crashed = await wait_state(driver, "victim", "crashed", timeout_s=3)
    assert "exited without the driver stopping it" in crashed.message
    assert crashed.started_at is None
    assert [(vm.name, vm.state) for vm in await driver.list()] == [("victim", "crashed")]

    # An agent restarted after the crash sees it too.
    await driver.close()
    restarted = drivers(driver.state_dir)
    assert [vm.state for vm in await restarted.recover()] == ["crashed"]
    again = await restarted.start("victim")
    assert again.state == "running" and qemu_running(pid_of(again))
    assert (await restarted.stop("victim", force=True)).state == "stopped"
    assert not qemu_running(pid_of(again))


async def test_graceful_stop_kills_a_guest_that_ignores_the_power_button(
    drivers: DriverFactory,
) -> None:
    driver = drivers()
    image = drivers.image
    # PID 1 is `sleep`: no acpid, so the power button does nothing.
    deaf = DirectKernelBoot(
        kernel=image.boot.kernel,
        initrd=image.boot.initrd,
        cmdline="console=ttyS0 quiet rdinit=/bin/sleep -- 3600",
    )
    await driver.define(new_vm("deaf"), boot=deaf)
    pid = pid_of(await driver.start("deaf"))
    stopped = await driver.stop("deaf", timeout_s=3)
    assert stopped.state == "stopped"
    assert stopped.message == "the guest did not power off within 3 s; qemu was killed"
    assert not qemu_running(pid)


async def run(*argv: str) -> str:
    """Run a host tool; its stdout and stderr together (qemu-io reports failures in text)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return out.decode()


async def qemu_io(image: Path, command: str) -> str:
    return await run("qemu-io", "-f", "qcow2", "-c", command, str(image))


async def test_guest_reads_and_writes_disks_that_the_host_checks_after_poweroff(
    drivers: DriverFactory, scratch: Path
) -> None:
    data = scratch / "data.qcow2"
    assert await run("qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M") == ""
    assert "wrote 1048576/1048576 bytes" in await qemu_io(data, "write -P 0xab 0 1M")
    root = scratch / "root.qcow2"  # an overlay: the cached tiny image stays untouched
    tiny = str(drivers.image.disk.path)
    overlay = await run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", tiny, "-F", "qcow2", str(root)
    )
    assert overlay == ""

    driver = drivers(accel="auto")
    fingerprint = await driver.fingerprint()
    assert fingerprint["accelerator"] in ("kvm", "tcg")
    assert fingerprint["accelerator_reason"]
    disks = [DiskConfig(path=data, format="qcow2"), DiskConfig(path=root, format="qcow2")]
    await driver.define(new_vm("disk"), disks=disks)
    started = await driver.start("disk")
    assert started.extra["qemu.accel"] == fingerprint["accelerator"]
    console = console_of(driver, "disk")
    await console.wait_booted()

    assert await console.command("read-pattern /dev/vda 0xab 1") == "pattern ok"
    assert await console.command("read-pattern /dev/vda 0xcd 1") == "pattern mismatch"
    assert await console.command("read-pattern /dev/vdb 0x00 1") == "pattern ok"  # blank image
    assert await console.command("write-pattern /dev/vda 0xcd 1") == "pattern written"
    assert await console.command("read-pattern /dev/vda 0xcd 1") == "pattern ok"
    await console.command("poweroff", expect="corral-guest: powering off")

    # The guest powered itself off: stopped, not crashed, and QEMU is gone.
    stopped = await wait_state(driver, "disk", "stopped", timeout_s=20)
    assert stopped.message == GUEST_POWERED_OFF
    assert not qemu_running(pid_of(started))
    assert "Pattern verification failed" not in await qemu_io(data, "read -P 0xcd 0 1M")
    assert "Pattern verification failed" in await qemu_io(data, "read -P 0xab 0 1M")


async def test_disks_hot_plug_into_and_out_of_a_running_guest(
    drivers: DriverFactory, scratch: Path
) -> None:
    data = scratch / "hot.qcow2"
    assert await run("qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M") == ""
    assert "wrote 1048576/1048576 bytes" in await qemu_io(data, "write -P 0x5a 0 1M")
    driver = drivers()
    await driver.define(new_vm("hot"))
    started = await driver.start("hot")
    console = console_of(driver, "hot")
    await console.wait_booted()
    assert "no block device /dev/vda" in await console.command("read-pattern /dev/vda 0x5a 1")

    attached = await driver.attach_disk("hot", DriverDisk(id="hot-data", path=str(data)))
    assert [d.id for d in attached.disks] == ["hot-data"]
    assert attached.state == "running" and attached.started_at == started.started_at

    async def guest_sees_vda() -> str:
        for _ in range(40):
            answer = await console.command("read-pattern /dev/vda 0x5a 1")
            if "no block device" not in answer:
                return answer
            await asyncio.sleep(0.5)
        return answer

    assert await guest_sees_vda() == "pattern ok"
    assert await console.command("write-pattern /dev/vda 0x6b 1") == "pattern written"

    detached = await driver.detach_disk("hot", "hot-data")
    assert detached.disks == () and detached.state == "running"
    assert "no block device /dev/vda" in await console.command("read-pattern /dev/vda 0x6b 1")
    # Released by QEMU: the host can open the image again and sees what the guest wrote.
    assert "Pattern verification failed" not in await qemu_io(data, "read -P 0x6b 0 1M")
    # Idempotent both ways, and the definition remembers no disk for the next start.
    assert (await driver.detach_disk("hot", "hot-data")).disks == ()
    restarted = await driver.stop("hot", force=True)
    assert restarted.disks == ()


async def test_a_new_agent_recovers_running_guests_without_restarting_them(
    drivers: DriverFactory,
) -> None:
    state_dir = drivers.new_state_dir()
    names = ["rec-a", "rec-b"]
    guest_json = drivers.image.disk.path.with_name("tiny.json")
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        str(AGENT),
        str(state_dir),
        str(guest_json),
        *names,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None and agent.stderr is not None
        line = await asyncio.wait_for(agent.stdout.readline(), 60)
        assert line, (await agent.stderr.read()).decode()
        before = json.loads(line)
    finally:
        agent.kill()  # the agent dies; its guests must not
        await agent.wait()

    driver = drivers(state_dir)
    consoles = {name: console_of(driver, name) for name in names}
    await asyncio.gather(*(c.wait_heartbeat(2) for c in consoles.values()))
    recovered = {vm.name: vm for vm in await driver.recover()}
    assert sorted(recovered) == names
    for name in names:
        vm = recovered[name]
        assert vm.state == "running"
        assert pid_of(vm) == before[name]["pid"]
        assert vm.started_at == datetime.fromisoformat(before[name]["started_at"])
    last = {name: c.heartbeats()[-1] for name, c in consoles.items()}
    for name, console in consoles.items():
        beats = await console.wait_heartbeat(last[name] + 2, timeout_s=15)
        assert beats == list(range(1, len(beats) + 1))  # still counting, never restarted
        assert console.lines().count(BOOTED) == 1
    stopped = await asyncio.gather(*(driver.stop(n, force=True) for n in names))
    assert [vm.state for vm in stopped] == ["stopped", "stopped"]
    assert not any(qemu_running(before[n]["pid"]) for n in names)


async def test_vnc_moves_to_a_free_display_when_its_port_was_taken(drivers: DriverFactory) -> None:
    driver = drivers()
    await driver.define(new_vm("screen"))
    taken = driver.vnc_port("screen")
    squatter = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", taken)
    try:
        started = await driver.start("screen")
        port = driver.vnc_port("screen")
        assert port != taken
        assert started.extra["qemu.vnc"] == f"127.0.0.1:{port}"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readexactly(12)).startswith(b"RFB ")  # a VNC server answers
        writer.close()
        await writer.wait_closed()
    finally:
        squatter.close()
        await squatter.wait_closed()
    await driver.stop("screen", force=True)


async def test_a_qemu_its_handle_never_recorded_is_adopted_not_started_twice(
    drivers: DriverFactory,
) -> None:
    driver = drivers()
    await driver.define(new_vm("orphan"))
    # As if the agent died right after QEMU daemonized, before it wrote the pid to the handle.
    launched = await asyncio.create_subprocess_exec(*await driver.command_line("orphan"))
    assert await launched.wait() == 0
    vm = await inspect(driver, "orphan")
    assert vm.state == "running" and vm.started_at is not None
    pid = pid_of(vm)
    assert qemu_running(pid)
    assert pid_of(await driver.start("orphan")) == pid  # no second QEMU on the same disks
    assert (await driver.stop("orphan", force=True)).state == "stopped"
    assert not qemu_running(pid)
