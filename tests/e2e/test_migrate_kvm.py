"""Live migration of a KVM guest (``-cpu host``): hosts compare the CPU guests see there.

Skipped where QEMU cannot use KVM at all; the migration of a booted guest also needs guests to
boot under KVM (nested KVM on some machines passes the device checks and stalls every guest).
Both agents run on this machine, so their CPUs match and the migration goes through; a source
CPU with a feature this host lacks is refused by the target's driver, naming the feature.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.agent.drivers.qemu.migration import QemuMigrator
from corral.agent.drivers.qemu.process import expand_host_cpu, probe_kvm
from corral.errors import DriverError
from corral.model.migration import IncomingMigration
from tests.e2e.conftest import DriverFactory
from tests.e2e.test_cluster_qemu import REPO, alive
from tests.e2e.test_migrate_qemu import FAST, create_vm, migrate_and_check
from tests.integration.harness import AgentProcess, node_states, token, wait_for

pytestmark = pytest.mark.timeout(600)


def _kvm_state() -> tuple[bool, bool, str]:
    """(the KVM device opens and QEMU expands ``-cpu host``, guests boot under KVM, why not)."""
    try:
        asyncio.run(expand_host_cpu("qemu-system-x86_64"))
    except DriverError as exc:
        return False, False, f"qemu cannot use kvm here: {exc}"
    boots, why = asyncio.run(probe_kvm("qemu-system-x86_64", 3.0))
    return True, boots, why


KVM, KVM_BOOTS, WHY = _kvm_state()
pytestmark = [pytestmark, pytest.mark.skipif(not KVM, reason=WHY)]


def _env() -> dict[str, str]:
    guest_dir = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    return {
        "CORRAL_DRIVER": "qemu",
        "CORRAL_GUEST_IMAGE": str(guest_dir / "tiny.json"),
        "CORRAL_QEMU_ACCEL": "kvm",
        "CORRAL_STOP_TIMEOUT_S": "10",
    }


@pytest.fixture
def hosts() -> Iterator[dict[str, Any]]:
    data = Path(tempfile.mkdtemp(prefix="ck-", dir="/tmp"))
    n1 = AgentProcess(data / "n1", name="n1", bind="127.0.0.1", env=_env(), extra_args=FAST)
    agents = [n1]
    try:
        n1.start()
        n2 = AgentProcess(
            data / "n2",
            name="n2",
            bind="127.0.0.2",
            env=_env(),
            extra_args=[*FAST, *n1.join_args(token(n1, uses=1))],
        )
        agents.append(n2)
        n2.start(bootstrap=False, timeout_s=90)
        wait_for(lambda: node_states(n1) == {"n1": "ready", "n2": "ready"}, 60, "2 ready nodes")
        yield {"n1": n1, "n2": n2, "data": data}
    finally:
        for a in agents:
            try:
                a.stop(timeout_s=30)
            except AssertionError:
                a.kill()
        for pidfile in data.glob("*/driver/vms/*/qemu.pid"):
            text = pidfile.read_text().strip()
            if text and alive(int(text)):
                os.kill(int(text), signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


def test_hosts_report_the_cpu_their_kvm_guests_see(hosts: dict[str, Any]) -> None:
    n1: AgentProcess = hosts["n1"]
    with n1.client(timeout=60) as c:
        cpus = [
            c.get(f"/api/v1/nodes/{node}").json()["status"]["inventory"]["cpu"]
            for node in ("n1", "n2")
        ]
    assert cpus[0]["vendor"] and cpus[0]["model"] and "apic" in cpus[0]["features"], cpus[0]
    assert cpus[0] == cpus[1]  # one machine: one CPU


@pytest.mark.skipif(not KVM_BOOTS, reason=f"kvm guests do not boot here: {WHY}")
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
