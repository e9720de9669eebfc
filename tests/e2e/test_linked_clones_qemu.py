"""Linked clones of a running VM and clones to another host or pool, with real guests, through
the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.agent.drivers.qemu import GuestImage
from tests.e2e.test_cluster_qemu import REPO, alive, cli, wait_for
from tests.e2e.test_snapshots_qemu import (
    cli_fails,
    console,
    create,
    import_tiny,
    qemu_io_read,
    run,
    vm_json,
)
from tests.integration.harness import AgentProcess, node_states, token

pytestmark = pytest.mark.timeout(900)

QEMU_ENV = {
    "CORRAL_DRIVER": "qemu",
    "CORRAL_QEMU_ACCEL": "tcg",
    "CORRAL_STOP_TIMEOUT_S": "20",
}


def volume(agent: AgentProcess, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads(cli(agent, "volume", "show", name, "-o", "json"))  # type: ignore[no-any-return]


def volumes(agent: AgentProcess) -> dict[str, dict]:  # type: ignore[type-arg]
    items = json.loads(cli(agent, "volume", "ls", "-o", "json"))["items"]
    return {v["name"]: v for v in items}


def backing(path: str) -> str | None:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", path))
    return info.get("backing-filename")  # type: ignore[no-any-return]


def exists(path: str) -> bool:
    return Path(path).exists()


def tasks(agent: AgentProcess) -> list[dict]:  # type: ignore[type-arg]
    with httpx.Client(base_url=agent.url, timeout=30) as c:
        return c.get("/api/v1/tasks", params={"limit": 100}).json()["items"]  # type: ignore[no-any-return]


def _cleanup(agents: list[AgentProcess], data: Path) -> None:
    for agent in agents:
        agent.stop(timeout_s=60)
    for pidfile in data.glob("*/driver/vms/*/qemu.pid"):
        text = pidfile.read_text().strip()
        if text and alive(pid := int(text)):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def two_hosts(guest_image: GuestImage) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    """n1 on 127.0.0.1 (bootstrap), n2 on 127.0.0.2 joined later (``join``)."""
    data = Path(tempfile.mkdtemp(prefix="lk-", dir="/tmp"))
    guest_dir = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    env = {**QEMU_ENV, "CORRAL_GUEST_IMAGE": str(guest_dir / "tiny.json")}
    n1 = AgentProcess(data / "n1", name="n1", bind="127.0.0.1", env=env)
    n2 = AgentProcess(data / "n2", name="n2", bind="127.0.0.2", env=env)
    n1.start()
    try:
        yield n1, n2
    finally:
        _cleanup([n2, n1], data)


def join(n1: AgentProcess, n2: AgentProcess) -> None:
    n2.extra_args = n1.join_args(token(n1, uses=1))
    n2.start(bootstrap=False, timeout_s=90)
    wait_for(lambda: node_states(n1).get("n2") == "ready", 60, "n2 ready")


async def test_linked_clone_of_a_running_vm_shares_a_frozen_base(
    two_hosts: tuple[AgentProcess, AgentProcess],
) -> None:
    n1, _ = two_hosts
    import_tiny(n1)
    create(n1, "lk-1")
    src = console(n1, "lk-1")
    await src.wait_booted(timeout_s=120)
    assert await src.command("write-pattern /dev/vda 0x5a 1") == "pattern written"
    pid = vm_json(n1, "lk-1")["status"]["runtime"]["qemu.pid"]
    first_file = volume(n1, "lk-1-disk0")["status"]["path"]

    out = cli(n1, "vm", "clone", "lk-1", "lk-2", "--linked", "--start", "--timeout", "120")
    assert "vm lk-2 running on n1" in out, out

    # The source ran on throughout: same QEMU, its heartbeat goes on, now on a new top file.
    assert vm_json(n1, "lk-1")["status"]["runtime"]["qemu.pid"] == pid
    beat = max(src.heartbeats())
    await src.wait_heartbeat(beat + 2)
    found = volumes(n1)
    bases = [v for v in found.values() if v["status"]["attached_to"] == "linked-clones"]
    assert len(bases) == 1, found
    base = bases[0]
    assert base["status"]["path"] == first_file
    assert not os.stat(first_file).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    src_file = found["lk-1-disk0"]["status"]["path"]
    clone_file = found["lk-2-disk0"]["status"]["path"]
    assert src_file != first_file
    assert found["lk-1-disk0"]["spec"]["backing_volume"] == base["name"]
    assert found["lk-2-disk0"]["spec"]["backing_volume"] == base["name"]
    assert backing(src_file) == first_file and backing(clone_file) == first_file

    # The clone boots with the source's data; writes of either never reach the other.
    clone = console(n1, "lk-2")
    await clone.wait_booted(timeout_s=120)
    assert await clone.command("read-pattern /dev/vda 0x5a 1") == "pattern ok"
    assert await clone.command("write-pattern /dev/vda 0x66 1") == "pattern written"
    assert await src.command("write-pattern /dev/vda 0x77 1") == "pattern written"
    assert await src.command("read-pattern /dev/vda 0x77 1") == "pattern ok"
    assert await clone.command("read-pattern /dev/vda 0x66 1") == "pattern ok"
    assert qemu_io_read(first_file, "0x5a")
    assert qemu_io_read(src_file, "0x77")
    assert qemu_io_read(clone_file, "0x66")

    # The base cannot be deleted while anything reads through it.
    refused = cli_fails(n1, "volume", "delete", base["name"], "--yes")
    assert "lk-1-disk0" in refused.stderr and "lk-2-disk0" in refused.stderr, refused.stderr

    # The source goes with its disks: the base stays for the clone, which runs on.
    cli(n1, "vm", "delete", "lk-1", "--with-disks", "--yes", "--timeout", "90")
    wait_for(lambda: "lk-1-disk0" not in volumes(n1), 60, "the source's volume to go")
    assert not exists(src_file)
    assert exists(first_file) and base["name"] in volumes(n1)
    mark = clone.mark()
    await clone.wait_for(lambda lines: len(clone.heartbeats(mark)) >= 2, timeout_s=60)
    assert await clone.command("read-pattern /dev/vda 0x66 1") == "pattern ok"

    # The last linked clone goes: so does the base, file and record.
    cli(n1, "vm", "delete", "lk-2", "--with-disks", "--yes", "--timeout", "90")
    wait_for(lambda: not exists(first_file), 60, "the base's file to be removed")
    wait_for(lambda: base["name"] not in volumes(n1), 30, "the base's record to go")
    assert not exists(clone_file)


async def test_full_clone_to_another_host_boots_there_with_the_data(
    two_hosts: tuple[AgentProcess, AgentProcess],
) -> None:
    n1, n2 = two_hosts
    import_tiny(n1)
    create(n1, "far-1")  # before n2 joins: it runs on n1
    src = console(n1, "far-1")
    await src.wait_booted(timeout_s=120)
    assert await src.command("write-pattern /dev/vda 0x3c 1") == "pattern written"
    pid = vm_json(n1, "far-1")["status"]["runtime"]["qemu.pid"]
    join(n1, n2)

    refused = cli_fails(n1, "vm", "clone", "far-1", "far-x", "--linked", "--to", "n2")
    assert "--full --to n2" in refused.stderr, refused.stderr
    out = cli(n1, "vm", "clone", "far-1", "far-2", "--to", "n2", "--start", "--timeout", "180")
    assert "vm far-2 running on n2" in out, out
    assert vm_json(n1, "far-1")["status"]["runtime"]["qemu.pid"] == pid
    copied = volume(n1, "far-2-disk0")
    assert copied["status"]["node"] == "n2"
    assert copied["status"]["path"].startswith(str(n2.data_dir))
    assert backing(copied["status"]["path"]) is None

    far = console(n2, "far-2")
    await far.wait_booted(timeout_s=120)
    assert await far.command("read-pattern /dev/vda 0x3c 1") == "pattern ok"
    # The source host's export is gone (no qemu-nbd left behind) and no temporary snapshot.
    assert not list((n1.data_dir / "run").glob("nbd-*.pid"))
    tags = run("qemu-img", "snapshot", "-l", "-U", volume(n1, "far-1-disk0")["status"]["path"])
    assert "corral-copy" not in tags
    clone_task = next(t for t in tasks(n1) if t["spec"]["action"] == "clone")
    assert clone_task["status"]["result"]["to"] == "n2"

    # A full clone into another pool of the same host (the source keeps running).
    fast = n1.data_dir.parent / "fast-pool"
    cli(n1, "pool", "create", "fast", "--path", str(fast))
    refused = cli_fails(n1, "vm", "clone", "far-1", "far-x", "--linked", "--pool", "fast")
    assert "--full --pool fast" in refused.stderr, refused.stderr
    refused = cli_fails(n1, "vm", "clone", "far-1", "far-x", "--pool", "nope")
    assert "no pool 'nope'" in refused.stderr, refused.stderr
    out = cli(n1, "vm", "clone", "far-1", "far-3", "--pool", "fast", "--start", "--timeout", "180")
    assert "vm far-3 running on n1" in out, out
    moved = volume(n1, "far-3-disk0")
    assert moved["spec"]["pool"] == "fast"
    assert moved["status"]["path"].startswith(str(fast)), moved["status"]["path"]
    assert backing(moved["status"]["path"]) is None
    assert vm_json(n1, "far-1")["status"]["runtime"]["qemu.pid"] == pid
    far3 = console(n1, "far-3")
    await far3.wait_booted(timeout_s=120)
    assert await far3.command("read-pattern /dev/vda 0x3c 1") == "pattern ok"

    # A stopped VM is frozen with qemu-img alone; a template of it (an overlay on that base)
    # is copied to the other host as one flattened file.
    cli(n1, "vm", "stop", "far-1", "--timeout", "90")
    out = cli(n1, "vm", "clone", "far-1", "far-4", "--linked")
    assert "vm far-4 stopped on n1" in out, out
    frozen = volume(n1, "far-1-disk0")
    assert frozen["spec"]["backing_volume"] == volume(n1, "far-4-disk0")["spec"]["backing_volume"]
    cli(n1, "template", "create", "tpl", "--from", "far-1")
    refused = cli_fails(n1, "vm", "create", "far-5", "--template", "tpl", "--to", "n2")
    assert "--full --to n2" in refused.stderr, refused.stderr
    out = cli(
        n1, "vm", "create", "far-5", "--template", "tpl", "--full", "--to", "n2", "--timeout", "180"
    )
    assert "vm far-5 running on n2" in out, out
    assert backing(volume(n1, "far-5-disk0")["status"]["path"]) is None
    far5 = console(n2, "far-5")
    await far5.wait_booted(timeout_s=120)
    assert await far5.command("read-pattern /dev/vda 0x3c 1") == "pattern ok"
