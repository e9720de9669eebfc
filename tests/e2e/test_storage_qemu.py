"""Images and volumes used by real guests, driven through the CLI a user types."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.e2e.console import GuestConsole
from tests.e2e.test_cluster_qemu import (  # noqa: F401  (qemu_agent is a fixture)
    REPO,
    cli,
    qemu_agent,
    wait_for,
)
from tests.integration.harness import AgentProcess


def is_file(path: str) -> bool:
    return Path(path).is_file()


def qemu_io(path: str, command: str) -> str:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, path], capture_output=True, text=True
    ).stdout


async def test_a_guest_boots_from_an_imported_image_and_gets_a_volume_hot_plugged(
    qemu_agent: AgentProcess,  # noqa: F811
) -> None:
    guest_dir = Path(os.environ.get("CORRAL_GUEST_DIR", REPO / ".cache" / "guest"))
    out = cli(qemu_agent, "image", "import", "tiny", "--file", str(guest_dir / "tiny.json"))
    assert out.strip() == "image tiny ready"
    assert "direct-kernel" in cli(qemu_agent, "image", "ls")

    out = cli(
        qemu_agent,
        "vm",
        "create",
        "st-1",
        "--image",
        "tiny",
        "--disk",
        "1G",
        "--memory",
        "128",
        "--timeout",
        "90",
    )
    assert "vm st-1 running on n1" in out, out
    show = cli(qemu_agent, "vm", "show", "st-1")
    assert "st-1-disk0" in show and "tcg" in show
    vm_dir = qemu_agent.data_dir / "driver" / "vms" / "st-1"
    console = GuestConsole(vm_dir / "console.log", vm_dir / "serial.sock")
    await console.wait_booted(timeout_s=90)
    # The boot disk is a linked clone of the (blank) image disk: the guest reads zeros.
    assert await console.command("read-pattern /dev/vda 0x00 1") == "pattern ok"

    out = cli(qemu_agent, "volume", "create", "data-1", "--size", "1", "--node", "n1")
    path = out.split(" on n1: ")[1].rstrip(")\n")
    assert is_file(path)
    assert "wrote 1048576/1048576" in qemu_io(path, "write -P 0x7e 0 1M")

    out = cli(qemu_agent, "vm", "disk", "attach", "st-1", "data-1", "--timeout", "60")
    assert "vm st-1 disks: st-1-disk0, data-1" in out, out

    async def vdb_pattern() -> str:
        answer = ""
        for _ in range(40):
            answer = await console.command("read-pattern /dev/vdb 0x7e 1")
            if "no block device" not in answer:
                return answer
        return answer

    assert await vdb_pattern() == "pattern ok"
    assert await console.command("write-pattern /dev/vdb 0x3c 1") == "pattern written"

    out = cli(qemu_agent, "vm", "disk", "detach", "st-1", "data-1", "--timeout", "60")
    assert "vm st-1 disks: st-1-disk0" in out, out
    assert "no block device" in await console.command("read-pattern /dev/vdb 0x3c 1")
    assert "Pattern verification failed" not in qemu_io(path, "read -P 0x3c 0 1M")

    # Deleting the VM with its disks takes the boot volume, not the detached one.
    cli(qemu_agent, "vm", "delete", "st-1", "--yes", "--with-disks", "--timeout", "90")
    volumes = lambda: cli(qemu_agent, "volume", "ls")  # noqa: E731
    wait_for(lambda: "st-1-disk0" not in volumes(), 30, "the boot volume to be deleted")
    assert "data-1" in volumes()
    cli(qemu_agent, "volume", "delete", "data-1", "--yes")
    assert not is_file(path)
