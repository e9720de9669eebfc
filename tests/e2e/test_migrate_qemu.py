"""Live migration of real guests (QEMU under TCG) between two real agents on 127.0.0.1/.2.

What a user sees: the guest's heartbeat counter goes on without a reboot on the target, the
source QEMU is gone, `vm show` names the new host, the task reports QEMU's downtime; a disk
pattern written during a local-disk migration reads back on the target; a cancelled migration
leaves the guest on the source and no QEMU on the target.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.console import GuestConsole
from tests.e2e.test_cluster_qemu import REPO, alive, cli
from tests.integration.harness import AgentProcess, node_states, token, wait_for

pytestmark = pytest.mark.timeout(600)

FAST = ["--lease-ttl-s", "6", "--leader-ttl-s", "4", "--node-down-after-s", "20"]
_BEAT = re.compile(r"corral-heartbeat (\d+)")


def _env(accel: str = "tcg") -> dict[str, str]:
    guest_dir = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    return {
        "CORRAL_DRIVER": "qemu",
        "CORRAL_GUEST_IMAGE": str(guest_dir / "tiny.json"),
        "CORRAL_QEMU_ACCEL": accel,
        "CORRAL_STOP_TIMEOUT_S": "10",
    }


@contextlib.contextmanager
def two_hosts(accel: str = "tcg") -> Iterator[dict[str, Any]]:
    """n1 (bootstrap) on 127.0.0.1 and n2 (second server) on 127.0.0.2, QEMU driver."""
    data = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    env = _env(accel)
    n1 = AgentProcess(data / "n1", name="n1", bind="127.0.0.1", env=env, extra_args=FAST)
    agents = [n1]
    try:
        n1.start()
        t = token(n1, uses=3)
        n2 = AgentProcess(
            data / "n2",
            name="n2",
            bind="127.0.0.2",
            env=env,
            extra_args=[*FAST, *n1.join_args(t)],
        )
        agents.append(n2)
        n2.start(bootstrap=False, timeout_s=90)
        wait_for(lambda: node_states(n1) == {"n1": "ready", "n2": "ready"}, 60, "2 ready nodes")
        yield {"n1": n1, "n2": n2, "data": data}
    finally:
        for a in agents:
            print(f"--- {a.name} log ---\n{a.tail(60)}")
            try:
                a.stop(timeout_s=30)
            except AssertionError:
                a.kill()
        for pidfile in data.glob("*/driver/vms/*/qemu.pid"):
            text = pidfile.read_text().strip()
            if text and alive(int(text)):
                os.kill(int(text), signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def hosts() -> Iterator[dict[str, Any]]:
    with two_hosts() as h:
        yield h


def vm_dir(hosts: dict[str, Any], node: str, name: str) -> Path:
    return Path(hosts["data"]) / node / "driver" / "vms" / name


def guest_console(hosts: dict[str, Any], node: str, name: str) -> GuestConsole:
    d = vm_dir(hosts, node, name)
    return GuestConsole(d / "console.log", d / "serial.sock")


def beats(text: str) -> list[int]:
    return [int(m.group(1)) for m in _BEAT.finditer(text)]


def create_vm(c: httpx.Client, name: str, volume: str, pool: str) -> dict[str, Any]:
    r = c.post("/api/v1/volumes", json={"name": volume, "pool": pool, "size_gib": 1})
    assert r.status_code in (201, 202), r.text
    r = c.post(
        "/api/v1/vms",
        params={"wait": "true", "timeout": "120"},
        json={"name": name, "memory_mib": 256, "disks": [{"volume": volume}]},
    )
    assert r.status_code == 200, r.text
    vm: dict[str, Any] = r.json()["object"]
    assert vm["status"]["state"] == "running", vm
    return vm


def other(node: str) -> str:
    return "n2" if node == "n1" else "n1"


def migrate_and_check(hosts: dict[str, Any], name: str) -> dict[str, Any]:
    n1: AgentProcess = hosts["n1"]
    with n1.client(timeout=180) as c:
        vm = c.get(f"/api/v1/vms/{name}").json()
        source = vm["status"]["node"]
        source_pid = int(vm["status"]["runtime"]["qemu.pid"])
        src_console = guest_console(hosts, source, name)
        wait_for(lambda: len(beats(src_console.log.read_text())) >= 3, 90, "heartbeats")
        before = beats(src_console.log.read_text())
        target = other(source)
        out = cli(n1, "vm", "migrate", name, "--to", target, "--max-downtime", "300ms")
        assert f"vm {name} migrated from {source} to {target}" in out, out
        assert "downtime" in out
        vm = c.get(f"/api/v1/vms/{name}").json()
        assert vm["status"]["node"] == target
        assert f"{target}" in cli(n1, "vm", "show", name)
        wait_for(lambda: not alive(source_pid), 30, "the source QEMU gone")
        tgt_log = vm_dir(hosts, target, name) / "console.log"
        after = wait_for(
            lambda: (b := beats(tgt_log.read_text())) and len(b) >= 3 and b, 60, "target beats"
        )
        # The counter goes on from where it was: no reboot (a reboot restarts at 1).
        assert after[0] > before[-1] - 1, (before[-3:], after[:3])
        assert "corral-guest: booted" not in tgt_log.read_text()
        assert after == list(range(after[0], after[0] + len(after))), after
        tasks = c.get("/api/v1/tasks", params={"target": f"vm/{name}"}).json()["items"]
        task = next(t for t in tasks if t["spec"]["action"] == "migrate")
        assert task["status"]["state"] == "succeeded"
        assert isinstance(task["status"]["result"]["downtime_ms"], int)
        wait_for(
            lambda: c.get(f"/api/v1/vms/{name}").json()["status"]["state"] == "running",
            30,
            "the target reports the vm running",
        )
        return task


def test_live_migration_on_a_shared_pool(hosts: dict[str, Any]) -> None:
    shared = Path(hosts["data"]) / "shared"
    shared.mkdir()
    n1: AgentProcess = hosts["n1"]
    cli(n1, "pool", "create", "shared", "--path", str(shared), "--shared")
    with n1.client(timeout=180) as c:
        create_vm(c, "web-1", "web-1-data", "shared")
    task = migrate_and_check(hosts, "web-1")
    assert task["status"]["result"]["local_volumes"] == []


async def test_live_migration_with_local_disks_keeps_what_the_guest_writes(
    hosts: dict[str, Any],
) -> None:
    n1: AgentProcess = hosts["n1"]
    with n1.client(timeout=180) as c:
        vm = create_vm(c, "db-1", "db-1-data", "local")
        source = vm["status"]["node"]
        target = other(source)
        con = guest_console(hosts, source, "db-1")
        await con.wait_booted(timeout_s=90)
        assert await con.command("write-pattern /dev/vda 0x5a 16", timeout_s=60) == (
            "pattern written"
        )
        # The guest writes 48 MiB and syncs (over 5 s under TCG) while its disk is mirrored and
        # its memory moved: the write starts on the source and ends on the target.
        since = con.mark()
        await con.type("write-pattern /dev/vda 0xc3 48")
        r = c.post("/api/v1/vms/db-1/migrate", json={"target": target})
        assert r.status_code == 202, r.text
        task = c.get(
            f"/api/v1/tasks/{r.json()['task']['id']}", params={"wait": "true", "timeout": "240"}
        ).json()
        assert task["status"]["state"] == "succeeded", task
        assert task["status"]["result"]["local_volumes"] == ["db-1-data"]
        assert "pattern written" not in con.lines(since), "the write ended before the switch-over"
        assert c.get("/api/v1/vms/db-1").json()["status"]["node"] == target
        volume = c.get("/api/v1/volumes/db-1-data").json()
        assert volume["status"]["node"] == target
        assert str(hosts["data"] / target) in volume["status"]["path"]
        tcon = guest_console(hosts, target, "db-1")
        # The write in flight completes on the target, and every byte of it is there.
        await tcon.wait_for(lambda lines: "pattern written" in lines, timeout_s=120)
        assert await tcon.command("read-pattern /dev/vda 0xc3 48", timeout_s=120) == "pattern ok"


def test_cancel_keeps_the_guest_on_the_source(hosts: dict[str, Any]) -> None:
    n1: AgentProcess = hosts["n1"]
    with n1.client(timeout=180) as c:
        vm = create_vm(c, "app-1", "app-1-data", "local")
        source = vm["status"]["node"]
        pid = int(vm["status"]["runtime"]["qemu.pid"])
        # A slow link (1 MiB/s) keeps the migration going long enough to cancel it.
        r = c.post(
            "/api/v1/vms/app-1/migrate", json={"target": other(source), "bandwidth_mib_s": 1}
        )
        assert r.status_code == 202, r.text
        task_id = r.json()["task"]["id"]
        wait_for(
            lambda: c.get("/api/v1/migrations/app-1").json()["status"]["phase"] == "migrating",
            90,
            "the transfer to start",
        )
        time.sleep(1.0)
        out = cli(n1, "task", "cancel", task_id)
        assert "cancel of task" in out
        final = c.get(f"/api/v1/tasks/{task_id}", params={"wait": "true", "timeout": "120"})
        assert final.json()["status"]["state"] == "cancelled", final.json()
        vm = c.get("/api/v1/vms/app-1").json()
        assert vm["status"]["node"] == source
        assert alive(pid), "the guest keeps running on the source"
        wait_for(
            lambda: c.get("/api/v1/vms/app-1").json()["status"]["state"] == "running", 30, "running"
        )
        target_dir = vm_dir(hosts, other(source), "app-1")
        wait_for(lambda: not target_dir.exists(), 60, "the target cleaned")
        log = vm_dir(hosts, source, "app-1") / "console.log"
        n = len(beats(log.read_text()))
        wait_for(lambda: len(beats(log.read_text())) > n + 1, 30, "heartbeats go on at the source")
