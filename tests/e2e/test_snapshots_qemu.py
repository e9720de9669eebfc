"""Snapshots, clones and templates of real guests, driven through the CLI a user types."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.console import GuestConsole
from tests.e2e.test_cluster_qemu import (  # noqa: F401  (qemu_agent is a fixture)
    REPO,
    cli,
    qemu_agent,
    wait_for,
)
from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.timeout(600)


def qemu_io_read(path: str, byte: str) -> bool:
    """Whether the first MiB of ``path`` is all ``byte`` (read beside a running QEMU)."""
    out = subprocess.run(
        ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {byte} 0 1M", path],
        capture_output=True,
        text=True,
    ).stdout
    return "read 1048576/1048576" in out and "verification failed" not in out


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout


def cli_fails(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "corral", "--addr", agent.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, done.stdout
    return done


def vm_json(agent: AgentProcess, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads(cli(agent, "vm", "show", name, "-o", "json"))  # type: ignore[no-any-return]


def console(agent: AgentProcess, name: str) -> GuestConsole:
    vm_dir = agent.data_dir / "driver" / "vms" / name
    return GuestConsole(vm_dir / "console.log", vm_dir / "serial.sock")


def volume_path(agent: AgentProcess, name: str) -> str:
    return str(json.loads(cli(agent, "volume", "show", name, "-o", "json"))["status"]["path"])


def qemu_argv(vm: dict) -> str:  # type: ignore[type-arg]
    pid = vm["status"]["runtime"]["qemu.pid"]
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def import_tiny(agent: AgentProcess) -> None:
    guest_dir = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    out = cli(agent, "image", "import", "tiny", "--file", str(guest_dir / "tiny.json"))
    assert out.strip() == "image tiny ready"


def create(agent: AgentProcess, name: str) -> None:
    out = cli(
        agent,
        "vm",
        "create",
        name,
        "--image",
        "tiny",
        "--disk",
        "1G",
        "--memory",
        "128",
        "--nics",
        "1",
        "--timeout",
        "90",
    )
    assert f"vm {name} running on n1" in out, out


async def test_snapshot_with_memory_then_rollback_restores_disk_and_guest_counter(
    qemu_agent: AgentProcess,  # noqa: F811
) -> None:
    import_tiny(qemu_agent)
    create(qemu_agent, "sn-1")
    guest = console(qemu_agent, "sn-1")
    await guest.wait_booted(timeout_s=90)
    assert await guest.command("write-pattern /dev/vda 0x11 1") == "pattern written"
    await guest.wait_heartbeat(3)

    out = cli(qemu_agent, "vm", "snapshot", "create", "sn-1", "before", "--memory")
    assert "snapshot before of vm sn-1 taken (with memory)" in out, out
    at_snapshot = max(guest.heartbeats())
    assert await guest.command("write-pattern /dev/vda 0x22 1") == "pattern written"
    await guest.wait_heartbeat(at_snapshot + 4)
    listing = cli(qemu_agent, "vm", "snapshot", "ls", "sn-1")
    assert "before *" in listing and "running" in listing, listing
    assert "RAM SIZE" in listing and "DISK" in listing, listing

    mark = guest.mark()
    out = cli(qemu_agent, "vm", "snapshot", "rollback", "sn-1", "before")
    assert "vm sn-1 rolled back to before (with memory)" in out, out

    # The guest goes on from the counter it had at the snapshot, and its disk is the old one.
    # (Beats printed before the rollback took hold come first: the counter then drops back.)
    def resumed() -> bool:
        beats = guest.heartbeats(mark)
        back = [i for i, n in enumerate(beats) if n <= at_snapshot + 1]
        return bool(back) and beats[back[0] + 1 :][:1] == [beats[back[0]] + 1]

    await guest.wait_for(lambda lines: resumed(), timeout_s=60)
    assert await guest.command("read-pattern /dev/vda 0x11 1") == "pattern ok"
    assert vm_json(qemu_agent, "sn-1")["status"]["state"] == "running"

    # A tree: a disk-only snapshot hangs from "before"; deleting "before" re-parents it.
    out = cli(qemu_agent, "vm", "snapshot", "create", "sn-1", "after", "--no-memory")
    assert "(disks only)" in out, out
    snaps = json.loads(cli(qemu_agent, "vm", "snapshot", "ls", "sn-1", "-o", "json"))["items"]
    assert [(s["spec"]["snapshot"], s["status"]["parent"]) for s in snaps] == [
        ("before", None),
        ("after", "before"),
    ]
    # Sizes as QEMU reports them: the saved RAM of "before"; the disk files' allocation.
    assert snaps[0]["status"]["vm_state_bytes"] > 1024 * 1024
    assert snaps[1]["status"]["vm_state_bytes"] == 0
    assert snaps[0]["status"]["disk_bytes"] > 0 and snaps[1]["status"]["disk_bytes"] > 0
    refused = cli_fails(qemu_agent, "vm", "snapshot", "rollback", "sn-1", "after")
    assert refused.returncode == 4 and "stop it first" in refused.stderr
    cli(qemu_agent, "vm", "snapshot", "delete", "sn-1", "before")
    snaps = json.loads(cli(qemu_agent, "vm", "snapshot", "ls", "sn-1", "-o", "json"))["items"]
    assert [(s["spec"]["snapshot"], s["status"]["parent"]) for s in snaps] == [("after", None)]
    disk = volume_path(qemu_agent, "sn-1-disk0")
    tags = run("qemu-img", "snapshot", "-l", "-U", disk)
    assert "after" in tags and "before" not in tags


async def test_clones_and_template_instances_boot_with_new_macs_and_never_touch_the_source(
    qemu_agent: AgentProcess,  # noqa: F811
) -> None:
    import_tiny(qemu_agent)
    create(qemu_agent, "src-1")
    src = console(qemu_agent, "src-1")
    await src.wait_booted(timeout_s=90)
    assert await src.command("write-pattern /dev/vda 0x5a 1") == "pattern written"
    src_vm = vm_json(qemu_agent, "src-1")
    src_mac = src_vm["spec"]["nics"][0]["mac"]
    assert src_mac.startswith("52:54:00:") and f"mac={src_mac}" in qemu_argv(src_vm)

    # A full clone of the running VM; the source keeps running.
    out = cli(qemu_agent, "vm", "clone", "src-1", "cl-1", "--start", "--timeout", "120")
    assert "vm cl-1 running on n1" in out, out
    assert vm_json(qemu_agent, "src-1")["status"]["state"] == "running"
    clone_vm = vm_json(qemu_agent, "cl-1")
    clone_mac = clone_vm["spec"]["nics"][0]["mac"]
    assert clone_mac != src_mac and f"mac={clone_mac}" in qemu_argv(clone_vm)
    clone = console(qemu_agent, "cl-1")
    await clone.wait_booted(timeout_s=90)
    assert await clone.command("read-pattern /dev/vda 0x5a 1") == "pattern ok"
    assert await clone.command("write-pattern /dev/vda 0x66 1") == "pattern written"
    assert qemu_io_read(volume_path(qemu_agent, "src-1-disk0"), "0x5a")
    assert qemu_io_read(volume_path(qemu_agent, "cl-1-disk0"), "0x66")
    refused = cli_fails(qemu_agent, "vm", "clone", "src-1", "cl-2", "--to", "n9")
    assert "no host 'n9'" in refused.stderr, refused.stderr

    # The stopped source becomes a read-only template.
    cli(qemu_agent, "vm", "stop", "src-1", "--timeout", "90")
    out = cli(qemu_agent, "template", "create", "base", "--from", "src-1")
    assert "template base created from vm src-1" in out, out
    assert "base" in cli(qemu_agent, "template", "ls")
    wait_for(lambda: "src-1" not in cli(qemu_agent, "vm", "ls"), 60, "src-1 to become the template")
    base_disk = volume_path(qemu_agent, "src-1-disk0")
    assert not os.stat(base_disk).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    refused = cli_fails(qemu_agent, "volume", "delete", "src-1-disk0", "--yes")
    assert "template:base" in refused.stderr

    # An instance: a linked clone of the template's disk, with its own MAC.
    out = cli(
        qemu_agent, "vm", "create", "app-1", "--template", "base", "--start", "--timeout", "120"
    )
    assert "vm app-1 running on n1" in out, out
    app_vm = vm_json(qemu_agent, "app-1")
    app_mac = app_vm["spec"]["nics"][0]["mac"]
    assert app_mac not in (src_mac, clone_mac) and f"mac={app_mac}" in qemu_argv(app_vm)
    app_disk = volume_path(qemu_agent, "app-1-disk0")
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", app_disk))
    assert info["backing-filename"] == base_disk
    app = console(qemu_agent, "app-1")
    await app.wait_booted(timeout_s=90)
    assert await app.command("read-pattern /dev/vda 0x5a 1") == "pattern ok"
    assert await app.command("write-pattern /dev/vda 0x77 1") == "pattern written"
    assert qemu_io_read(base_disk, "0x5a")
    assert qemu_io_read(app_disk, "0x77")

    # The template cannot go while app-1 depends on it, unless its data is copied in first.
    refused = cli_fails(qemu_agent, "template", "delete", "base")
    assert refused.returncode == 4 and "app-1" in refused.stderr, refused.stderr
    cli(qemu_agent, "vm", "stop", "app-1", "--timeout", "90")
    out = cli(qemu_agent, "template", "delete", "base", "--full-clones-first")
    assert "template base deleted" in out
    wait_for(lambda: not Path(base_disk).exists(), 60, "the template's disk to be removed")
    cli(qemu_agent, "vm", "start", "app-1", "--timeout", "90")
    mark = app.mark()
    await app.wait_booted(since=mark, timeout_s=90)
    assert await app.command("read-pattern /dev/vda 0x77 1") == "pattern ok"
