"""Real guests through the whole cluster: REST API -> leader -> node agent -> QEMU driver."""

from __future__ import annotations

import json
import os
import re
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


BOOTED = "corral-guest: booted"
_HEARTBEAT = re.compile(r"^corral-heartbeat (\d+)$")


def console(c: httpx.Client, name: str) -> str:
    r = c.get(f"/api/v1/vms/{name}/console/log")
    assert r.status_code == 200, r.text
    return r.text.replace("\r", "")


def beats_of_this_boot(text: str) -> list[int]:
    """The heartbeat numbers printed since the guest last booted (complete lines only)."""
    lines = text.split("\n")[:-1]
    last_boot = max((i for i, line in enumerate(lines) if line == BOOTED), default=-1)
    return [int(m.group(1)) for line in lines[last_boot + 1 :] if (m := _HEARTBEAT.match(line))]


def cli(agent: AgentProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "corral", "--addr", agent.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def shown_state(agent: AgentProcess, name: str) -> str:
    """The State row of `corral vm show NAME`, as a user reads it."""
    for line in cli(agent, "vm", "show", name).splitlines():
        key, _, value = line.partition("  ")
        if key.strip() == "State":
            return value.strip()
    raise AssertionError(f"no State row in `vm show {name}`")


def state(c: httpx.Client, name: str) -> dict[str, Any]:
    vm: dict[str, Any] = c.get(f"/api/v1/vms/{name}").json()
    return vm


def test_stop_start_reboot_pause_resume_a_real_guest(qemu_agent: AgentProcess) -> None:
    with qemu_agent.client(timeout=120) as c:
        out = cli(qemu_agent, "vm", "create", "life-1", "--memory", "128", "--timeout", "90")
        assert out.startswith("vm life-1 running on n1"), out
        assert shown_state(qemu_agent, "life-1") == "running"
        wait_for(lambda: len(beats_of_this_boot(console(c, "life-1"))) >= 2, 60, "heartbeats")

        out = cli(qemu_agent, "vm", "stop", "life-1", "--timeout", "90")
        assert out.startswith("vm life-1 stopped on n1"), out
        assert state(c, "life-1")["status"]["state"] == "stopped"
        assert shown_state(qemu_agent, "life-1") == "stopped"
        boots = console(c, "life-1").split("\n").count(BOOTED)

        out = cli(qemu_agent, "vm", "start", "life-1", "--timeout", "90")
        assert out.startswith("vm life-1 running on n1"), out
        wait_for(
            lambda: console(c, "life-1").split("\n").count(BOOTED) == boots + 1, 60, "a new boot"
        )
        booted_at = state(c, "life-1")["status"]["started_at"]

        out = cli(qemu_agent, "vm", "reboot", "life-1", "--timeout", "90")
        assert out.startswith("vm life-1 running on n1"), out
        assert state(c, "life-1")["status"]["started_at"] > booted_at
        wait_for(
            lambda: console(c, "life-1").split("\n").count(BOOTED) == boots + 2,
            60,
            "the guest to boot again after the reboot",
        )
        wait_for(lambda: len(beats_of_this_boot(console(c, "life-1"))) >= 3, 60, "heartbeats")

        # Paused: the vCPUs are frozen, so the guest's heartbeat counter stops.
        out = cli(qemu_agent, "vm", "pause", "life-1", "--timeout", "90")
        assert out.startswith("vm life-1 paused on n1"), out
        vm = state(c, "life-1")
        assert (vm["status"]["state"], vm["spec"]["power_state"]) == ("paused", "paused")
        assert shown_state(qemu_agent, "life-1") == "paused"
        frozen = beats_of_this_boot(console(c, "life-1"))
        time.sleep(3.5)
        assert beats_of_this_boot(console(c, "life-1")) == frozen, "a paused guest printed"
        pid = int(vm["status"]["runtime"]["qemu.pid"])
        assert alive(pid)

        # Resumed: the same boot goes on counting from where it stopped.
        out = cli(qemu_agent, "vm", "resume", "life-1", "-o", "json", "--timeout", "90")
        resumed = json.loads(out)
        assert resumed["object"]["status"]["state"] == "running"
        assert resumed["task"]["status"]["state"] == "succeeded"
        assert shown_state(qemu_agent, "life-1") == "running"
        beats = wait_for(
            lambda: (b := beats_of_this_boot(console(c, "life-1")))[len(frozen) :] and b,
            30,
            "a heartbeat after the resume",
        )
        assert beats[len(frozen)] == frozen[-1] + 1, (frozen, beats)
        assert state(c, "life-1")["status"]["runtime"]["qemu.pid"] == str(pid)

        cli(qemu_agent, "vm", "delete", "life-1", "--yes", "--timeout", "90")
        assert c.get("/api/v1/vms/life-1").status_code == 404
        wait_for(lambda: not alive(pid), 30, "QEMU to exit after delete")


def test_a_guest_killed_from_outside_follows_its_restart_policy(
    qemu_agent: AgentProcess,
) -> None:
    with qemu_agent.client(timeout=120) as c:
        r = c.post(
            "/api/v1/vms",
            params={"wait": "true", "timeout": "90"},
            json={"name": "crash-1", "memory_mib": 128},
        )
        assert r.status_code == 200, r.text
        vm = r.json()["object"]
        assert vm["spec"]["restart_policy"] == "on-failure"
        pid = int(vm["status"]["runtime"]["qemu.pid"])

        # on-failure (the default): reported crashed within seconds, then started again.
        os.kill(pid, signal.SIGKILL)
        crashed = wait_for(
            lambda: (v := state(c, "crash-1"))["status"]["state"] == "crashed" and v,
            15,
            "the crash to be reported",
        )
        assert crashed["status"]["message"] == (
            f"qemu (pid {pid}) exited without the driver stopping it; "
            "restart 1 in 1 s (policy on-failure)"
        )
        restarted = wait_for(
            lambda: (
                (v := state(c, "crash-1"))["status"]["state"] == "running"
                and v["status"]["runtime"].get("qemu.pid") not in (None, str(pid))
                and v
            ),
            60,
            "the guest started again",
        )
        pid = int(restarted["status"]["runtime"]["qemu.pid"])
        assert alive(pid)
        assert "restart 1 at " in restarted["status"]["message"]

        # never: reported crashed, and it stays so; the message says how to start it.
        cli(qemu_agent, "vm", "edit", "crash-1", "--restart-policy", "never")
        wait_for(
            lambda: (v := state(c, "crash-1"))["status"]["observed_generation"] == v["generation"],
            30,
            "the new policy applied on the node",
        )
        os.kill(pid, signal.SIGKILL)
        crashed = wait_for(
            lambda: (v := state(c, "crash-1"))["status"]["state"] == "crashed" and v,
            15,
            "the crash to be reported",
        )
        assert crashed["status"]["message"] == (
            f"qemu (pid {pid}) exited without the driver stopping it; not restarted "
            "(restart policy never); start it with `corral vm start crash-1`"
        )
        assert shown_state(qemu_agent, "crash-1") == "crashed"
        time.sleep(7)  # more than one resync of the agent
        assert state(c, "crash-1")["status"]["state"] == "crashed"
        assert shown_state(qemu_agent, "crash-1") == "crashed"

        out = cli(qemu_agent, "vm", "start", "crash-1", "--timeout", "90")
        assert out.startswith("vm crash-1 running on n1"), out
        assert alive(int(state(c, "crash-1")["status"]["runtime"]["qemu.pid"]))


def test_guests_outlive_a_killed_agent_and_the_next_one_adopts_them(
    qemu_agent: AgentProcess,
) -> None:
    """SIGKILL the agent (and with it its etcd) while two guests run; start it again: the
    same QEMU processes run them, reported running, with their boot time unchanged."""
    before: dict[str, tuple[int, str]] = {}
    with qemu_agent.client(timeout=120) as c:
        for name in ("keep-1", "keep-2"):
            r = c.post(
                "/api/v1/vms",
                params={"wait": "true", "timeout": "90"},
                json={"name": name, "memory_mib": 128},
            )
            assert r.status_code == 200 and r.json()["object"]["status"]["state"] == "running"
            vm = r.json()["object"]
            before[name] = (int(vm["status"]["runtime"]["qemu.pid"]), vm["status"]["started_at"])
    qemu_agent.kill()
    for pid, _ in before.values():
        assert alive(pid), "a guest died with its agent"
    qemu_agent.start(bootstrap=False, timeout_s=90)
    with qemu_agent.client(timeout=60) as c:
        for name, (pid, started_at) in before.items():
            vm = wait_for(
                lambda name=name: (
                    (v := c.get(f"/api/v1/vms/{name}").json())["status"]["state"] == "running"
                    and v["status"]["runtime"].get("qemu.pid")
                    and v
                ),
                60,
                f"{name} reported running by the new agent",
            )
            assert int(vm["status"]["runtime"]["qemu.pid"]) == pid
            assert vm["status"]["started_at"] == started_at
            assert alive(pid)
