"""Interactive consoles of real guests: the serial console and VNC over the API's WebSockets,
on the VM's own host and forwarded through the other host, and `corral vm console` in a pty.

Two hosts run the qemu driver: n1 (a server) and c1 (compute-only, its API a proxy). Two
guests are spread over them, so each guest is reached both where it runs and through the host
where it does not (server -> compute host, and compute host -> server).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from corral.agent.drivers.qemu import GuestImage
from tests.integration.harness import AgentProcess, token, wait_for

REPO = Path(__file__).resolve().parents[2]
FAST = ["--lease-ttl-s", "6", "--leader-ttl-s", "4", "--node-down-after-s", "20"]
VMS = ("con-1", "con-2")


def _qemu_env() -> dict[str, str]:
    guest_dir = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    return {
        "CORRAL_DRIVER": "qemu",
        "CORRAL_GUEST_IMAGE": str(guest_dir / "tiny.json"),
        "CORRAL_QEMU_ACCEL": "tcg",
        "CORRAL_STOP_TIMEOUT_S": "10",
    }


def _kill_leftover_qemu(data: Path) -> None:
    for pid_file in data.glob("*/driver/vms/*/qemu.pid"):
        text = pid_file.read_text().strip()
        if not text:
            continue
        pid = int(text)
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-system"):
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def hosts(guest_image: GuestImage) -> Iterator[dict[str, AgentProcess]]:
    """n1 (server) and c1 (compute-only), both running real guests; con-1 and con-2 running,
    one on each host."""
    # Unix socket paths are short (107 bytes): keep the data dirs near /.
    data = Path(tempfile.mkdtemp(prefix="cc-", dir="/tmp"))
    n1 = AgentProcess(data / "n1", name="n1", env=_qemu_env(), extra_args=FAST)
    c1 = AgentProcess(data / "c1", name="c1", bind="127.0.0.9", env=_qemu_env())
    try:
        n1.start()
        c1.extra_args = [*FAST, "--no-server", *n1.join_args(token(n1))]
        c1.start(bootstrap=False)
        with n1.client(timeout=150) as c:
            wait_for(
                lambda: (
                    all(
                        n["status"]["state"] == "ready"
                        for n in c.get("/api/v1/nodes").json()["items"]
                    )
                    and len(c.get("/api/v1/nodes").json()["items"]) == 2
                ),
                60,
                "both hosts ready",
            )
            for name in VMS:
                r = c.post(
                    "/api/v1/vms",
                    params={"wait": "true", "timeout": "120"},
                    json={"name": name, "memory_mib": 128},
                )
                assert r.status_code == 200, r.text
                assert r.json()["object"]["status"]["state"] == "running", r.text
            placed = {c.get(f"/api/v1/vms/{n}").json()["status"]["node"] for n in VMS}
            assert placed == {"n1", "c1"}, f"the guests should be spread, not {placed}"
            for name in VMS:  # booted: the heartbeat is on the console log
                wait_for(
                    lambda name=name: (
                        "corral-heartbeat 1" in c.get(f"/api/v1/vms/{name}/console/log").text
                    ),
                    90,
                    f"{name} to boot",
                )
        yield {"n1": n1, "c1": c1}
    finally:
        try:
            with n1.client(timeout=90) as c:
                for name in VMS:
                    c.delete(f"/api/v1/vms/{name}", params={"wait": "true", "timeout": "60"})
        except httpx.HTTPError:
            pass
        for agent in (c1, n1):
            try:
                agent.stop(timeout_s=60)
            except AssertionError:
                agent.kill()
        _kill_leftover_qemu(data)
        shutil.rmtree(data, ignore_errors=True)


def host_of(hosts: dict[str, AgentProcess], vm: str) -> str:
    return str(httpx.get(f"{hosts['n1'].url}/api/v1/vms/{vm}", timeout=10).json()["status"]["node"])


async def ticket_url(agent: AgentProcess, vm: str, console: str = "serial") -> str:
    async with httpx.AsyncClient(base_url=agent.url, timeout=30) as c:
        r = await c.post(f"/api/v1/vms/{vm}/console/ticket", json={"console": console})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["vm"] == vm and body["console"] == console and body["expires_at"].endswith("Z")
    return "ws://" + agent.url.removeprefix("http://") + body["path"]


async def read_until(ws: ClientConnection, pattern: str, timeout_s: float = 30.0) -> str:
    """Everything received until ``pattern`` (a regex) shows up in it."""
    seen = b""
    try:
        async with asyncio.timeout(timeout_s):
            while not re.search(pattern, seen.decode(errors="replace")):
                message = await ws.recv()
                assert isinstance(message, bytes), "console messages are binary"
                seen += message
    except TimeoutError:
        raise AssertionError(f"no {pattern!r} within {timeout_s} s; got {seen[-400:]!r}") from None
    return seen.decode(errors="replace")


@pytest.mark.parametrize("vm", VMS)
@pytest.mark.parametrize("via", ["n1", "c1"])
async def test_the_serial_console_reads_and_types(
    hosts: dict[str, AgentProcess], vm: str, via: str
) -> None:
    """Each guest through each host: on its own host, and forwarded by the other one."""
    url = await ticket_url(hosts[via], vm)
    async with connect(url) as ws:
        await read_until(ws, r"corral-heartbeat \d+")
        word = f"hello-ws-{vm}-via-{via}"
        await ws.send(f"echo {word}\n".encode())
        # The console does not echo input: this line is the guest's answer.
        await read_until(ws, rf"(^|\n){word}\r?\n")


@pytest.mark.parametrize("via", ["n1", "c1"])
async def test_a_line_typed_just_before_leaving_reaches_the_guest(
    hosts: dict[str, AgentProcess], via: str
) -> None:
    """QEMU drops what it has not read yet when its console client hangs up; the agent lets the
    last viewer's connection go only once QEMU took every byte."""
    vm = "con-2"
    word = f"typed-then-gone-via-{via}-" + "x" * 60
    async with connect(await ticket_url(hosts[via], vm)) as ws:
        await read_until(ws, r"corral-heartbeat \d+")
        await ws.send(f"echo {word}\n".encode())
    # No viewer is left: the guest's answer shows in the console log.
    async with httpx.AsyncClient(base_url=hosts["n1"].url, timeout=30) as c:
        deadline = asyncio.get_running_loop().time() + 30
        while word not in (log := (await c.get(f"/api/v1/vms/{vm}/console/log")).text):
            assert asyncio.get_running_loop().time() < deadline, log[-400:]
            await asyncio.sleep(0.5)


async def test_several_viewers_share_one_console(hosts: dict[str, AgentProcess]) -> None:
    vm = "con-1"
    local, other = (hosts["n1"], hosts["c1"])
    if host_of(hosts, vm) == "c1":
        local, other = other, local
    async with (
        connect(await ticket_url(local, vm)) as first,
        connect(await ticket_url(other, vm)) as second,
    ):
        await read_until(first, r"corral-heartbeat \d+")
        await read_until(second, r"corral-heartbeat \d+")
        await second.send(b"echo typed-by-the-second\n")
        for ws in (first, second):
            await read_until(ws, r"(^|\n)typed-by-the-second\r?\n")


async def test_a_ticket_is_single_use_and_bound_to_its_console(
    hosts: dict[str, AgentProcess],
) -> None:
    url = await ticket_url(hosts["c1"], "con-2")
    async with connect(url) as ws:
        await read_until(ws, r"corral-heartbeat \d+")
    for bad in (
        url,
        url.replace("/con-2/console", "/con-1/console"),
        url.replace("/console?", "/vnc?"),
    ):
        async with connect(bad) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "console/ticket" in closed.value.rcvd.reason


@pytest.mark.parametrize("via", ["n1", "c1"])
async def test_vnc_speaks_rfb_through_the_proxy(hosts: dict[str, AgentProcess], via: str) -> None:
    for vm in VMS:
        url = await ticket_url(hosts[via], vm, "vnc")
        async with connect(url, subprotocols=["binary"]) as ws:  # type: ignore[list-item]
            banner = await asyncio.wait_for(ws.recv(), 15)
            assert banner == b"RFB 003.008\n", banner
            # Answering the version gets the security types: the stream goes both ways.
            await ws.send(b"RFB 003.008\n")
            security = await asyncio.wait_for(ws.recv(), 15)
            assert isinstance(security, bytes) and security[0] >= 1 and 1 in security[1:]


def _read_pty(fd: int, pattern: str, timeout_s: float, seen: bytearray) -> str:
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} on the terminal; got {bytes(seen[-400:])!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return seen.decode(errors="replace")


def test_corral_vm_console_in_a_terminal(hosts: dict[str, AgentProcess]) -> None:
    """Through the compute host's API: raw mode, typing reaches the guest, Ctrl-] leaves and
    gives the terminal back as it was."""
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "--addr", hosts["c1"].url, "vm", "console", "con-1"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    seen = bytearray()
    try:
        _read_pty(master, r"Ctrl-\] leaves", 30, seen)
        _read_pty(master, r"corral-heartbeat \d+", 30, seen)
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0, "raw mode while attached"
        os.write(master, b"echo hi-cli\n")
        _read_pty(master, r"(^|\n)hi-cli\r?\n", 30, seen)
        os.write(master, b"\x1d")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert termios.tcgetattr(slave) == before, "the terminal is restored"
    os.close(master)
    os.close(slave)


def test_corral_vm_console_in_a_pipe(hosts: dict[str, AgentProcess]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "--addr",
            hosts["n1"].url,
            "vm",
            "console",
            "con-2",
            "--linger",
            "5",
        ],
        input=b"echo hi-pipe\n",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(rb"(^|\n)hi-pipe\r?\n", done.stdout), done.stdout[-400:]


def test_a_ticket_for_another_client(hosts: dict[str, AgentProcess]) -> None:
    """`--ticket-only -o json` hands a VNC ticket to another client (e.g. noVNC)."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "corral", "--addr", hosts["n1"].url, "-o", "json"),
            *("vm", "console", "con-1", "--ticket-only", "--vnc"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ticket = json.loads(done.stdout)
    assert ticket["console"] == "vnc" and ticket["path"].startswith("/api/v1/vms/con-1/vnc?")

    async def banner() -> bytes:
        url = "ws://" + hosts["c1"].url.removeprefix("http://") + ticket["path"]
        async with connect(url) as ws:
            message = await asyncio.wait_for(ws.recv(), 15)
            assert isinstance(message, bytes)
            return message

    assert asyncio.run(banner()) == b"RFB 003.008\n"


async def test_viewers_are_told_when_the_vm_stops(hosts: dict[str, AgentProcess]) -> None:
    """(Last in this module: it stops con-2.) Forwarded or not, the WebSocket closes with
    1001 and a reason saying the VM stopped."""
    vm = "con-2"
    async with (
        connect(await ticket_url(hosts["n1"], vm)) as first,
        connect(await ticket_url(hosts["c1"], vm)) as second,
    ):
        await read_until(first, r"corral-heartbeat \d+")
        await read_until(second, r"corral-heartbeat \d+")
        async with httpx.AsyncClient(base_url=hosts["n1"].url, timeout=90) as c:
            r = await c.post(f"/api/v1/vms/{vm}/stop", params={"wait": "true", "timeout": "60"})
        assert r.json()["object"]["status"]["state"] == "stopped", r.text
        for ws in (first, second):
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(30):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
            assert closed.value.rcvd.reason == f"vm {vm}'s console closed: the VM stopped"
