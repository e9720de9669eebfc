"""`corral node drain` of a host running real guests (QEMU under TCG, two real agents on
127.0.0.1/.2, a shared pool): both guests move live. What a user sees: the drain task shows
progress, each guest's heartbeat counter goes on from where it was on the other host (no
reboot), the source QEMUs are gone, capacity counts the guests on their new host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cluster_qemu import alive, cli
from tests.e2e.test_migrate_qemu import beats, create_vm, guest_console, hosts, vm_dir
from tests.integration.harness import AgentProcess, wait_for

__all__ = ["hosts"]  # the fixture: n1 and n2, QEMU driver

pytestmark = pytest.mark.timeout(600)

GUESTS = ("g-1", "g-2")


def test_drain_moves_two_guests_live(hosts: dict[str, Any]) -> None:
    shared = Path(hosts["data"]) / "shared"
    shared.mkdir()
    n1: AgentProcess = hosts["n1"]
    cli(n1, "pool", "create", "shared", "--path", str(shared), "--shared")
    with n1.client(timeout=180) as c:
        # Both guests on n1: n2 takes nothing while they are created.
        cli(n1, "node", "cordon", "n2")
        vms = {g: create_vm(c, g, f"{g}-data", "shared") for g in GUESTS}
        assert {v["status"]["node"] for v in vms.values()} == {"n1"}
        cli(n1, "node", "uncordon", "n2")
        pids = {g: int(v["status"]["runtime"]["qemu.pid"]) for g, v in vms.items()}
        booted = {g: v["status"]["started_at"] for g, v in vms.items()}
        for g in GUESTS:
            log = guest_console(hosts, "n1", g).log
            wait_for(lambda log=log: len(beats(log.read_text())) >= 3, 120, f"{g} heartbeats")
        before = {g: beats(guest_console(hosts, "n1", g).log.read_text()) for g in GUESTS}

        out = cli(n1, "node", "drain", "n1", "--no-wait")
        assert "drain of node n1 started" in out, out
        task_id = out.strip().rsplit(" ", 1)[-1]
        steps: list[str] = []
        progress: list[float] = []
        deadline = time.monotonic() + 300
        while True:
            task = c.get(f"/api/v1/tasks/{task_id}").json()
            steps.append(task["status"]["step"])
            progress.append(task["status"]["progress"])
            if task["status"]["finished_at"]:
                break
            assert time.monotonic() < deadline, task
            time.sleep(0.2)
        assert task["status"]["state"] == "succeeded", task["status"]
        moves = task["status"]["result"]["moves"]
        assert set(moves) == set(GUESTS)
        assert all(m["handle"].startswith("live:") for m in moves.values()), moves
        assert any("moving" in s for s in steps), steps
        assert progress == sorted(progress) and progress[-1] == 1.0, progress

        for g in GUESTS:
            vm = c.get(f"/api/v1/vms/{g}").json()
            assert vm["status"]["node"] == "n2", vm["status"]
            # The migrate task behind the move reported QEMU's downtime.
            migrate = c.get(f"/api/v1/tasks/{moves[g]['handle'].removeprefix('live:')}").json()
            assert migrate["status"]["state"] == "succeeded", migrate["status"]
            assert isinstance(migrate["status"]["result"]["downtime_ms"], int)
            wait_for(lambda g=g: not alive(pids[g]), 30, f"{g}: the source qemu gone")
            tgt = vm_dir(hosts, "n2", g) / "console.log"
            after = wait_for(
                lambda tgt=tgt: (b := beats(tgt.read_text())) and len(b) >= 3 and b,
                90,
                f"{g}: beats on n2",
            )
            # Same boot: the counter goes on (a reboot restarts at 1), no boot banner.
            assert after[0] >= before[g][-1], (before[g][-3:], after[:3])
            assert "corral-guest: booted" not in tgt.read_text()
        wait_for(
            lambda: all(
                c.get(f"/api/v1/vms/{g}").json()["status"]["state"] == "running" for g in GUESTS
            ),
            30,
            "both running on n2",
        )
        for g in GUESTS:
            assert c.get(f"/api/v1/vms/{g}").json()["status"]["started_at"] == booted[g]
        cap = c.get("/api/v1/capacity", params={"vcpus": 1, "memory_mib": 64}).json()
        used = {row["node"]: row["memory_mib"]["used"] for row in cap["nodes"]}
        assert used["n1"] == 0 and used["n2"] == 2 * 256, used
