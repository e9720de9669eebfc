"""The fake hypervisor: behaviour, injected failures, and a VM table that survives restarts."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from corral import __version__
from corral.agent.drivers import FakeDriver
from corral.agent.drivers.base import DriverVm
from corral.agent.drivers.fake import HANDLE_DIR
from corral.errors import DriverError
from corral.model import VmSpec


def new_vm(name: str = "web-1", vm_id: str = "id-1", epoch: int = 1) -> DriverVm:
    return DriverVm(name=name, vm_id=vm_id, epoch=epoch, spec=VmSpec(), state="stopped")


async def test_restarted_driver_recovers_running_vm_with_same_started_at(
    tmp_path: Path,
) -> None:
    first = FakeDriver(tmp_path)
    await first.define(new_vm())
    started = await first.start("web-1")
    await first.update("web-1", replace(started, applied_generation=7))
    assert started.state == "running" and started.started_at is not None

    # A new driver over the same directory is an agent restart.
    [recovered] = await FakeDriver(tmp_path).recover()
    assert recovered.state == "running"
    assert recovered.started_at == started.started_at
    assert recovered.applied_generation == 7
    assert recovered.spec == VmSpec()


async def test_a_shorter_record_rewritten_in_place_reads_back_whole(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    long_spec = VmSpec(labels={f"label-{i}": "x" * 40 for i in range(20)})
    await driver.define(replace(new_vm(), spec=long_spec))
    await driver.start("web-1")
    vm = await driver.inspect("web-1")
    assert vm is not None
    # The handle file keeps its size (updates write in place); the record in it is the new one.
    path = tmp_path / HANDLE_DIR / "web-1.json"
    size = path.stat().st_size
    await driver.update("web-1", replace(vm, spec=VmSpec(), applied_generation=3))
    assert path.stat().st_size == size
    [recovered] = await FakeDriver(tmp_path).recover()
    assert recovered.spec == VmSpec() and recovered.applied_generation == 3
    assert recovered.state == "running"


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _on_disk(state_dir: Path) -> dict[str, dict[str, object]]:
    """Every file in the handle directory (temporary ones included), parsed as JSON."""
    return {p.name: json.loads(p.read_text()) for p in sorted((state_dir / HANDLE_DIR).iterdir())}


async def test_each_vm_has_its_own_handle_file_and_no_temp_files_are_left(
    tmp_path: Path,
) -> None:
    driver = FakeDriver(tmp_path)
    for i in range(3):
        await driver.define(new_vm(f"vm-{i}", f"id-{i}"))
    await driver.start("vm-2")
    assert _names(tmp_path) == [HANDLE_DIR]
    files = _on_disk(tmp_path)
    assert list(files) == ["vm-0.json", "vm-1.json", "vm-2.json"]
    for name, row in files.items():
        assert row["version"] == 1
        assert f"{row['name']}.json" == name
    assert (files["vm-0.json"]["vm_id"], files["vm-0.json"]["state"]) == ("id-0", "stopped")
    assert files["vm-2.json"]["state"] == "running"


async def test_destroy_removes_only_that_vms_handle_file(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    for i in range(3):
        await driver.define(new_vm(f"vm-{i}", f"id-{i}"))
    await driver.destroy("vm-1")
    assert list(_on_disk(tmp_path)) == ["vm-0.json", "vm-2.json"]
    assert [vm.name for vm in await FakeDriver(tmp_path).recover()] == ["vm-0", "vm-2"]


async def test_leftover_temp_files_are_ignored_on_load(tmp_path: Path) -> None:
    await FakeDriver(tmp_path).define(new_vm())
    (tmp_path / HANDLE_DIR / ".web-2.json.abc123.tmp").write_text('{"torn": ')
    assert [vm.name for vm in await FakeDriver(tmp_path).recover()] == ["web-1"]


@pytest.mark.parametrize(
    "content",
    [
        '{"version": 1, "name": "bad"}',  # a row missing its fields
        '{"version": 1, "na',  # torn JSON
        "[]",  # not an object
        "",  # empty
    ],
)
async def test_corrupt_handle_file_is_a_driver_error_naming_it(
    tmp_path: Path, content: str
) -> None:
    await FakeDriver(tmp_path).define(new_vm())
    bad = tmp_path / HANDLE_DIR / "bad.json"
    bad.write_text(content)
    with pytest.raises(DriverError, match="corrupt handle file") as err:
        FakeDriver(tmp_path)
    assert str(bad) in str(err.value)


async def test_wrong_version_or_misnamed_handle_file_is_a_driver_error(tmp_path: Path) -> None:
    await FakeDriver(tmp_path).define(new_vm())
    handle = tmp_path / HANDLE_DIR / "web-1.json"
    row = json.loads(handle.read_text())
    handle.write_text(json.dumps({**row, "version": 2}))
    with pytest.raises(DriverError, match=r"web-1\.json: unsupported format version 2"):
        FakeDriver(tmp_path)
    handle.unlink()
    (tmp_path / HANDLE_DIR / "web-9.json").write_text(json.dumps(row))
    with pytest.raises(DriverError, match=r"web-9\.json: it holds vm 'web-1'"):
        FakeDriver(tmp_path)


async def test_a_name_that_is_no_file_name_is_refused(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    with pytest.raises(DriverError, match="cannot name a handle file"):
        await driver.define(new_vm("../escape"))
    assert await driver.list() == []
    assert not (tmp_path / "escape.json").exists()


async def test_start_is_idempotent_and_stop_clears_started_at(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    await driver.define(new_vm())
    first = await driver.start("web-1")
    again = await driver.start("web-1")
    assert again.started_at == first.started_at
    stopped = await driver.stop("web-1")
    assert (stopped.state, stopped.started_at) == ("stopped", None)
    assert (await FakeDriver(tmp_path).recover())[0].state == "stopped"


async def test_start_takes_start_delay_during_which_vm_is_still_stopped(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path, start_delay_s=0.05)
    await driver.define(new_vm())
    starting = asyncio.create_task(driver.start("web-1"))
    await asyncio.sleep(0.01)
    during = await driver.inspect("web-1")
    assert during is not None and during.state == "stopped"
    assert (await starting).state == "running"


async def test_injected_start_failure_matches_a_glob(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path, fail_start="db-*")
    await driver.define(new_vm("db-1", "id-db"))
    await driver.define(new_vm("web-1", "id-web"))
    with pytest.raises(DriverError) as err:
        await driver.start("db-1")
    assert str(err.value) == "fake driver: injected start failure for vm db-1"
    failed = await driver.inspect("db-1")
    assert failed is not None and failed.state == "stopped"
    assert (await driver.start("web-1")).state == "running"


async def test_reboot_changes_started_at_and_needs_a_running_vm(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    await driver.define(new_vm())
    with pytest.raises(DriverError, match="it is stopped"):
        await driver.reboot("web-1")
    booted = await driver.start("web-1")
    rebooted = await driver.reboot("web-1")
    assert rebooted.state == "running"
    assert rebooted.started_at is not None and booted.started_at is not None
    assert rebooted.started_at > booted.started_at


async def test_injected_crash_survives_a_restart(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    await driver.define(new_vm())
    await driver.start("web-1")
    driver.inject_crash("web-1")
    [vm] = await FakeDriver(tmp_path).recover()
    assert vm.state == "crashed"


async def test_define_is_idempotent_per_vm_id_and_refuses_a_taken_name(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    await driver.define(new_vm())
    await driver.start("web-1")
    again = await driver.define(new_vm())
    assert again.state == "running"  # defining again does not reset a running VM
    with pytest.raises(DriverError, match="already defined with id id-1"):
        await driver.define(new_vm(vm_id="id-2"))


async def test_update_stores_intent_but_not_runtime_state(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    await driver.define(new_vm())
    running = await driver.start("web-1")
    wish = DriverVm(
        name="web-1",
        vm_id="id-1",
        epoch=2,
        spec=VmSpec(memory_mib=1024),
        state="stopped",
        applied_generation=3,
    )
    updated = await driver.update("web-1", wish)
    assert (updated.state, updated.started_at) == ("running", running.started_at)
    assert (updated.epoch, updated.spec.memory_mib, updated.applied_generation) == (2, 1024, 3)


async def test_destroy_is_idempotent_and_unknown_vms_are_errors(tmp_path: Path) -> None:
    driver = FakeDriver(tmp_path)
    await driver.define(new_vm())
    await driver.destroy("web-1")
    await driver.destroy("web-1")
    assert await driver.inspect("web-1") is None
    assert await FakeDriver(tmp_path).list() == []
    with pytest.raises(DriverError, match="vm web-1 is not defined on this host"):
        await driver.start("web-1")


async def test_fingerprint_names_the_fake_hypervisor(tmp_path: Path) -> None:
    assert await FakeDriver(tmp_path).fingerprint() == {
        "hypervisor": "fake",
        "version": __version__,
    }
