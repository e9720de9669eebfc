"""Live migration of a KVM guest (``-cpu host``): hosts compare the CPU guests see there.

Skipped where QEMU cannot use KVM at all; the migration of a booted guest also needs guests to
boot under KVM (nested KVM on some machines passes the device checks and stalls every guest).
Both agents run on this machine, so their CPUs match and the migration goes through; a source
CPU with a feature this host lacks is refused by the target's driver, naming the feature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.agent.drivers.qemu.migration import QemuMigrator
from corral.agent.drivers.qemu.process import expand_host_cpu, probe_kvm
from corral.errors import DriverError
from corral.model.migration import IncomingMigration
from tests.e2e.conftest import DriverFactory
from tests.e2e.test_migrate_qemu import create_vm, migrate_and_check, two_hosts
from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.timeout(600)


def _kvm_state() -> tuple[bool, bool, str]:
    """(the KVM device opens and QEMU expands ``-cpu host``, guests boot under KVM, why not)."""
    try:
        asyncio.run(expand_host_cpu("qemu-system-x86_64"))
    except DriverError as exc:
        return False, False, f"qemu cannot use kvm here (runs where it can): {exc}"
    boots, why = asyncio.run(probe_kvm("qemu-system-x86_64", 3.0))
    return True, boots, why


KVM, KVM_BOOTS, WHY = _kvm_state()
pytestmark = [pytestmark, pytest.mark.skipif(not KVM, reason=WHY)]


@pytest.fixture
def hosts() -> Iterator[dict[str, Any]]:
    with two_hosts("kvm") as h:
        yield h


def test_hosts_report_the_cpu_their_kvm_guests_see(hosts: dict[str, Any]) -> None:
    n1: AgentProcess = hosts["n1"]
    with n1.client(timeout=60) as c:
        cpus = [
            c.get(f"/api/v1/nodes/{node}").json()["status"]["inventory"]["cpu"]
            for node in ("n1", "n2")
        ]
    assert cpus[0]["vendor"] and cpus[0]["model"] and "apic" in cpus[0]["features"], cpus[0]
    assert cpus[0] == cpus[1]  # one machine: one CPU


@pytest.mark.skipif(
    not KVM_BOOTS, reason=f"kvm guests do not boot here (runs where KVM works): {WHY}"
)
def test_a_kvm_guest_migrates_live_between_hosts_with_the_same_cpu(hosts: dict[str, Any]) -> None:
    n1: AgentProcess = hosts["n1"]
    shared = Path(hosts["data"]) / "shared"
    shared.mkdir()
    with n1.client(timeout=180) as c:
        r = c.post("/api/v1/pools", json={"name": "shared", "path": str(shared), "shared": True})
        assert r.status_code in (200, 201, 202), r.text
        vm = create_vm(c, "kvm-1", "kvm-1-data", "shared")
        assert vm["status"]["runtime"]["qemu.accel"] == "kvm"
        dry = c.post("/api/v1/vms/kvm-1/migrate", params={"dry_run": "true"}, json={})
        assert dry.status_code in (200, 202), dry.text
    task = migrate_and_check(hosts, "kvm-1")
    assert task["status"]["state"] == "succeeded"


async def test_the_target_refuses_a_source_cpu_with_a_feature_it_lacks(
    drivers: DriverFactory,
) -> None:
    driver = drivers(accel="kvm")
    own = await driver.host_cpu()
    assert own is not None
    migrator = QemuMigrator(driver)
    version = await driver._qemu_version()
    same = IncomingMigration(id="m1", source="s", accel="kvm", qemu_version=version, cpu=own)
    await migrator.check_compatible(same)
    richer = own.model_copy(update={"features": [*own.features, "corral-made-up-feature"]})
    with pytest.raises(DriverError, match="corral-made-up-feature"):
        await migrator.check_compatible(same.model_copy(update={"cpu": richer}))
