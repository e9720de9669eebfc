"""The leader dies in the middle of a live migration (QEMU under TCG, three real server agents
on 127.0.0.1/.2/.3, a shared pool).

n1 bootstraps the cluster and leads; the guest runs on n2 and is migrated to n3 over a slow
link while it dirties memory. Once the migration is ``migrating`` (RAM on the wire) n1's agent
is SIGKILLed. What a user sees: n2 or n3 is elected leader, the migration ends (it succeeds,
or rolls back) without anyone touching it, exactly one QEMU runs the guest, the VM record names
that QEMU's host and says ``running``, and the guest's heartbeat goes on on its console.
"""

from __future__ import annotations

import asyncio
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
from tests.e2e.test_cluster_qemu import alive, cli
from tests.e2e.test_migrate_qemu import FAST, _env, beats, create_vm
from tests.integration.harness import AgentProcess, node_states, token, wait_for

pytestmark = pytest.mark.timeout(600)

NAME = "lk-guest"
FINAL = ("succeeded", "failed", "cancelled")
_SENT = re.compile(r"transferring memory: (\d+) MiB sent")


def members(agent: AgentProcess) -> dict[str, str]:
    info = httpx.get(agent.url + "/api/v1/cluster", timeout=10).json()
    return {m["name"]: ("learner" if m["is_learner"] else "voter") for m in info["members"]}


def leader_of(agent: AgentProcess) -> str | None:
    info = httpx.get(agent.url + "/api/v1/cluster", timeout=5).json()["leader"]
    return info["node"] if info else None


@pytest.fixture
def three() -> Iterator[dict[str, Any]]:
    """n1 (bootstrap), n2 and n3: three etcd voters, QEMU driver."""
    data = Path(tempfile.mkdtemp(prefix="lk-", dir="/tmp"))
    n1 = AgentProcess(data / "n1", name="n1", bind="127.0.0.1", env=_env(), extra_args=FAST)
    agents = [n1]
    try:
        n1.start()
        t = token(n1, uses=3)
        n2 = AgentProcess(
            data / "n2",
            name="n2",
            bind="127.0.0.2",
            env=_env(),
            extra_args=[*FAST, *n1.join_args(t)],
        )
        agents.append(n2)
        n2.start(bootstrap=False, timeout_s=90)
        wait_for(lambda: members(n1) == {"n1": "voter", "n2": "voter"}, 90, "n2 a voter")
        n3 = AgentProcess(
            data / "n3",
            name="n3",
            bind="127.0.0.3",
            env=_env(),
            extra_args=[*FAST, *n1.join_args(t)],
        )
        agents.append(n3)
        n3.start(bootstrap=False, timeout_s=90)
        wait_for(lambda: members(n1) == dict.fromkeys(["n1", "n2", "n3"], "voter"), 90, "3 voters")
        wait_for(
            lambda: node_states(n1) == dict.fromkeys(["n1", "n2", "n3"], "ready"),
            60,
            "3 ready nodes",
        )
        yield {"n1": n1, "n2": n2, "n3": n3, "data": data}
    finally:
        for a in agents:
            print(f"--- {a.name} log ---\n{a.tail(80)}")
            try:
                a.stop(timeout_s=30)
            except AssertionError:
                a.kill()
        for pidfile in data.glob("*/driver/vms/*/qemu.pid"):
            text = pidfile.read_text().strip()
            if text and alive(int(text)):
                os.kill(int(text), signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


def guest_qemus(data: Path, name: str) -> dict[int, str]:
    """Every live QEMU on this machine running VM ``name`` of this cluster: pid -> host (the
    host whose driver directory it runs from), found by scanning /proc, not by asking corral."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not Path(argv[0].decode(errors="replace")).name.startswith("qemu-system"):
            continue
        args = [a.decode(errors="replace") for a in argv]
        if not any(a.startswith(f"guest={name},") for a in args):
            continue
        for host in ("n1", "n2", "n3"):
            if any(str(data / host / "driver" / "vms" / name) in a for a in args):
                found[int(entry.name)] = host
    return found


@pytest.mark.parametrize("then", ["carry-on", "cancel"])
async def test_leader_killed_mid_migration(three: dict[str, Any], then: str) -> None:
    """``carry-on``: nobody touches the migration after the kill; ``cancel``: the user cancels
    it once the new leader is in charge, which must then roll it back (guest stays on n2)."""
    n1: AgentProcess = three["n1"]
    n2: AgentProcess = three["n2"]
    data: Path = three["data"]
    assert leader_of(n2) == "n1", "the bootstrap host leads"
    shared = data / "shared"
    shared.mkdir()
    cli(n1, "pool", "create", "shared", "--path", str(shared), "--shared")
    # The guest on n2: the other hosts take nothing while it is created.
    cli(n1, "node", "cordon", "n1")
    cli(n1, "node", "cordon", "n3")
    with n1.client(timeout=180) as c:
        vm = create_vm(c, NAME, f"{NAME}-data", "shared")
    assert vm["status"]["node"] == "n2", vm["status"]
    cli(n1, "node", "uncordon", "n3")
    con = GuestConsole(
        data / "n2" / "driver" / "vms" / NAME / "console.log",
        data / "n2" / "driver" / "vms" / NAME / "serial.sock",
    )
    await con.wait_booted(timeout_s=120)
    await con.wait_heartbeat(3, timeout_s=60)
    # Memory rewritten all along and a 2 MiB/s link: RAM takes a while to converge.
    await con.command("dirty-memory 16", expect="dirtying 16 MiB", timeout_s=60)
    before = beats(con.log.read_text())
    assert list(guest_qemus(data, NAME).values()) == ["n2"]

    with n2.client(timeout=30) as c:
        r = c.post(f"/api/v1/vms/{NAME}/migrate", json={"target": "n3", "bandwidth_mib_s": 2})
        assert r.status_code == 202, r.text
        task_id = r.json()["task"]["id"]
        wait_for(
            lambda: c.get(f"/api/v1/migrations/{NAME}").json()["status"]["phase"] == "migrating",
            120,
            "the transfer to start",
        )

        def sent_mib() -> int:
            step = c.get(f"/api/v1/tasks/{task_id}").json()["status"]["step"]
            m = _SENT.search(step)
            return int(m.group(1)) if m else -1

        # Mid-way: RAM on the wire, some of it sent.
        wait_for(lambda: sent_mib() >= 4, 120, "4 MiB of RAM sent", poll_s=0.1)
        step = c.get(f"/api/v1/tasks/{task_id}").json()["status"]["step"]
        print(f"\nkilling the leader n1 during: {step}")
        killed_at = time.monotonic()
        n1.kill()

        elected = wait_for(
            lambda: (who := leader_of(n2)) not in (None, "n1") and who, 60, "a new leader"
        )
        took_leader = time.monotonic() - killed_at
        assert elected in ("n2", "n3")
        if then == "cancel":
            assert c.get(f"/api/v1/migrations/{NAME}").json()["status"]["phase"] == "migrating"
            assert "cancel of task" in cli(n2, "task", "cancel", task_id)

        def ended() -> dict[str, Any] | None:
            m: dict[str, Any] = c.get(f"/api/v1/migrations/{NAME}").json()
            return m if m["status"]["phase"] in FINAL else None

        migration = wait_for(ended, 240, "the migration to end under the new leader", poll_s=0.5)
        took_end = time.monotonic() - killed_at
        phase = migration["status"]["phase"]
        if then == "cancel":
            assert phase == "cancelled", migration["status"]
        task = c.get(f"/api/v1/tasks/{task_id}").json()
        assert task["status"]["finished_at"], task["status"]
        expected_task = {"succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}
        assert task["status"]["state"] == expected_task[phase], (phase, task["status"])

        # Exactly one QEMU runs the guest (the other side's is gone or quit within a bound).
        qemus = wait_for(
            lambda: len(q := guest_qemus(data, NAME)) == 1 and q, 60, "exactly one QEMU"
        )
        ((pid, host),) = qemus.items()
        assert host == ("n3" if phase == "succeeded" else "n2"), (phase, qemus)
        # ... and stays the only one.
        await asyncio.sleep(3)
        assert guest_qemus(data, NAME) == qemus

        def record_matches() -> dict[str, Any] | None:
            v: dict[str, Any] = c.get(f"/api/v1/vms/{NAME}").json()
            ok = v["status"]["node"] == host and v["status"]["state"] == "running"
            return v if ok else None

        vm = wait_for(record_matches, 60, f"the VM record: running on {host}")
        assert int(vm["status"]["runtime"]["qemu.pid"]) == pid, vm["status"]["runtime"]

        # The guest's heartbeat goes on, read as a user does (through the API).
        def api_beats() -> list[int]:
            r = c.get(f"/api/v1/vms/{NAME}/console/log")
            r.raise_for_status()
            return beats(r.text)

        seen = wait_for(lambda: (b := api_beats()) and b, 30, "heartbeats in the console log")
        wait_for(lambda: api_beats()[-1] >= seen[-1] + 2, 30, "the heartbeat counter to go on")
        after = api_beats()
        # Same boot either way: the counter goes on from before the migration.
        assert after[-1] > before[-1], (before[-3:], after[-3:])
        print(
            f"leader n1 SIGKILLed mid-migration: {elected} elected after {took_leader:.1f}s, "
            f"migration {phase} after {took_end:.1f}s, guest on {host} (qemu {pid}), "
            f"heartbeat {before[-1]} -> {after[-1]}"
        )
