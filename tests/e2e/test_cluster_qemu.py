"""Real guests through the whole cluster: REST API -> leader -> node agent -> QEMU driver."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.agent.drivers.qemu import GuestImage
from tests.integration.harness import AgentProcess

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-system")


@pytest.fixture
def qemu_agent(guest_image: GuestImage) -> Iterator[AgentProcess]:
    # Unix socket paths are short (107 bytes): keep the data dir near /.
    data = Path(tempfile.mkdtemp(prefix="cc-", dir="/tmp"))
    guest_dir = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    agent = AgentProcess(
        data / "n1",
        env={
            "CORRAL_DRIVER": "qemu",
            "CORRAL_GUEST_IMAGE": str(guest_dir / "tiny.json"),
            "CORRAL_QEMU_ACCEL": "tcg",
            "CORRAL_STOP_TIMEOUT_S": "20",
        },
    )
    agent.start()
    yield agent
    try:
        with agent.client() as c:
            for vm in c.get("/api/v1/vms").json().get("items", []):
                c.delete(f"/api/v1/vms/{vm['name']}", params={"wait": "true", "timeout": "60"})
    except httpx.HTTPError:
        pass
    agent.stop(timeout_s=60)
    for handle in (data / "n1" / "driver" / "vms").glob("*/handle.json"):
        pid_text = handle.parent.joinpath("qemu.pid")
        if pid_text.exists() and alive(pid := int(pid_text.read_text().strip() or 0)):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(data, ignore_errors=True)


def test_a_real_guest_through_the_api(qemu_agent: AgentProcess) -> None:
    with qemu_agent.client(timeout=120) as c:
        node = c.get("/api/v1/nodes/n1").json()
        assert node["status"]["inventory"]["driver"] == "qemu"
        r = c.post(
            "/api/v1/vms",
            params={"wait": "true", "timeout": "90"},
            json={"name": "real-1", "vcpus": 1, "memory_mib": 256},
        )
        assert r.status_code == 200, r.text
        vm = r.json()["object"]
        assert r.json()["task"]["status"]["state"] == "succeeded"
        assert vm["status"]["state"] == "running"
        pid = int(vm["status"]["runtime"]["qemu.pid"])
        assert alive(pid), "the VM's QEMU process runs"
        # The guest's console, through the API and the CLI: its heartbeat counter goes up.
        log = wait_for(
            lambda: (
                "corral-heartbeat 3" in (t := c.get("/api/v1/vms/real-1/console/log").text) and t
            ),
            60,
            "the guest's heartbeat on its console",
        )
        assert "corral-guest: booted" in log
        cli = subprocess.run(
            [sys.executable, "-m", "corral", "--addr", qemu_agent.url, "vm", "log", "real-1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0 and "corral-heartbeat" in cli.stdout
        assert vm["status"]["runtime"]["qemu.accel"] == "tcg"

        r = c.post("/api/v1/vms/real-1/stop", params={"wait": "true", "timeout": "90"})
        assert r.json()["object"]["status"]["state"] == "stopped"
        wait_for(lambda: not alive(pid), 30, "QEMU to exit after a stop")

        r = c.post("/api/v1/vms/real-1/start", params={"wait": "true", "timeout": "90"})
        running = r.json()["object"]
        assert running["status"]["state"] == "running"
        pid = int(running["status"]["runtime"]["qemu.pid"])
        assert alive(pid)

    # The agent dies; the guest does not. A new agent re-attaches to the same QEMU.
    qemu_agent.kill()
    assert alive(pid), "a guest must survive its agent"
    qemu_agent.start(bootstrap=False)
    with qemu_agent.client(timeout=120) as c:
        vm = wait_for(
            lambda: (v := c.get("/api/v1/vms/real-1").json())["status"]["state"] == "running" and v,
            30,
            "real-1 running after the agent restart",
        )
        assert int(vm["status"]["runtime"]["qemu.pid"]) == pid, "re-attached, not restarted"
        assert vm["status"]["started_at"] == running["status"]["started_at"]

        r = c.delete("/api/v1/vms/real-1", params={"wait": "true", "timeout": "90"})
        assert r.status_code == 200 and r.json()["task"]["status"]["state"] == "succeeded"
        wait_for(lambda: not alive(pid), 30, "QEMU to exit after delete")


def test_a_guest_killed_from_outside_is_started_again(qemu_agent: AgentProcess) -> None:
    with qemu_agent.client(timeout=120) as c:
        r = c.post(
            "/api/v1/vms",
            params={"wait": "true", "timeout": "90"},
            json={"name": "crash-1", "memory_mib": 128, "power_state": "stopped"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["object"]["status"]["state"] == "stopped"
        r = c.post("/api/v1/vms/crash-1/start", params={"wait": "true", "timeout": "90"})
        pid = int(r.json()["object"]["status"]["runtime"]["qemu.pid"])
        os.kill(pid, signal.SIGKILL)
        # Noticed within seconds and, running being the VM's desired state (restart policy
        # "always", the only one for now), started again on a new QEMU process.
        restarted = wait_for(
            lambda: (
                (v := c.get("/api/v1/vms/crash-1").json())["status"]["state"] == "running"
                and v["status"]["runtime"].get("qemu.pid") not in (None, str(pid))
                and v
            ),
            45,
            "the crash to be noticed and the guest started again",
        )
        assert alive(int(restarted["status"]["runtime"]["qemu.pid"]))
