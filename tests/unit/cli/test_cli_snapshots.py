"""`corral vm snapshot ls` (a tree with sizes) and what `corral vm clone` sends."""

from __future__ import annotations

import json

import httpx

from corral.client.testing import FakeCorralApi

from .support import Cli

MIB = 1024 * 1024


def test_snapshot_ls_draws_the_tree_with_ram_and_disk_sizes(cli: Cli, fake: FakeCorralApi) -> None:
    fake.add_snapshot(
        "web-1", "base", with_memory=True, vm_state_bytes=48 * MIB, disk_bytes=10 * MIB
    )
    fake.add_snapshot("web-1", "a", parent="base", disk_bytes=14 * MIB)
    fake.add_snapshot("web-1", "b", parent="base", current=True, disk_bytes=12 * MIB)
    result = cli("vm", "snapshot", "ls", "web-1")
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert "RAM" in lines[0] and "DISK" in lines[0]
    rows = {line[0] if line[0] != "└" else line[1]: " ".join(line) for line in lines[1:]}
    assert "48.0 MiB 10.0 MiB" in rows["base"]
    assert "14.0 MiB (+4.0 MiB) base" in rows["a"]
    assert rows["b"].startswith("└ b *"), rows["b"]


def test_clone_sends_linked_and_the_target_host(cli: Cli, fake: FakeCorralApi) -> None:
    accepted = httpx.Response(
        202,
        json={
            "object": None,
            "task": {"id": "t-1", "kind": "task", "name": "t-1", "status": {"state": "pending"}},
        },
    )
    fake.inject(accepted, method="POST", path="/api/v1/vms/web-1/clone", times=2)
    result = cli("vm", "clone", "web-1", "web-9", "--linked", "--no-wait")
    assert result.exit_code == 0, result.output
    result = cli("vm", "clone", "web-1", "web-8", "--to", "n2", "--start", "--no-wait")
    assert result.exit_code == 0, result.output
    sent = [json.loads(r.content) for r in fake.requests if r.url.path == "/api/v1/vms/web-1/clone"]
    assert sent == [
        {"name": "web-9", "linked": True, "start": False},
        {"name": "web-8", "linked": False, "start": True, "to": "n2"},
    ]


def test_to_without_a_template_is_a_usage_error(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "create", "web-3", "--to", "n2")
    assert result.exit_code == 2
    assert "--to" in result.stderr and "only with --template" in result.stderr
    assert fake.requests == []
