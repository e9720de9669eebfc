"""The issue's CLI session, typed as a new user would, against a real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.integration


def corral(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_ADDR": agent.url, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_first_session(shared_agent: AgentProcess) -> None:
    status = corral(shared_agent, "cluster", "status")
    assert status.returncode == 0, status.stderr
    assert "Leader" in status.stdout and "n1" in status.stdout and "voter" in status.stdout

    nodes = corral(shared_agent, "node", "ls")
    assert nodes.returncode == 0
    assert "ready" in nodes.stdout and "server,compute" in nodes.stdout

    made = corral(
        shared_agent,
        "vm",
        "create",
        "web-1",
        "--vcpus",
        "2",
        "--memory",
        "512",
        "--label",
        "tier=web",
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("vm web-1 running on n1 (task ")

    listed = corral(shared_agent, "vm", "ls")
    row = next(line for line in listed.stdout.splitlines() if line.startswith("web-1"))
    assert row.split()[:5] == ["web-1", "running", "n1", "2", "512Mi"]

    shown = corral(shared_agent, "vm", "show", "web-1", "-o", "json")
    vm = json.loads(shown.stdout)
    assert vm["kind"] == "vm" and vm["spec"]["labels"] == {"tier": "web"}
    assert vm["status"]["state"] == "running"

    for verb, state in (("stop", "stopped"), ("start", "running")):
        result = corral(shared_agent, "vm", verb, "web-1")
        assert result.returncode == 0, result.stderr
        assert f"vm web-1 {state} on n1" in result.stdout

    as_json = corral(shared_agent, "-o", "json", "vm", "ls")
    assert [v["name"] for v in json.loads(as_json.stdout)["items"]] == ["web-1"]

    tasks = json.loads(corral(shared_agent, "task", "ls", "-o", "json").stdout)["items"]
    assert [t["spec"]["action"] for t in tasks if t["spec"]["target"]["name"] == "web-1"] == [
        "create",
        "stop",
        "start",
    ]

    deleted = corral(shared_agent, "vm", "delete", "web-1", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    gone = corral(shared_agent, "vm", "show", "web-1")
    assert gone.returncode == 3
    assert "not found" in gone.stderr


def test_exit_codes_and_errors(shared_agent: AgentProcess) -> None:
    bad = corral(shared_agent, "vm", "create", "bad-1", "--memory", "12")
    assert bad.returncode == 1
    assert "memory_mib: must be >= 64" in bad.stderr
    usage = corral(shared_agent, "vm", "create", "bad-2", "--memory", "lots")
    assert usage.returncode == 2
    assert corral(shared_agent, "vm", "create", "dup-1", "--memory", "64").returncode == 0
    dup = corral(shared_agent, "vm", "create", "dup-1", "--memory", "64")
    assert dup.returncode == 4
    assert "already exists" in dup.stderr
    down = subprocess.run(
        [sys.executable, "-m", "corral", "--addr", "127.0.0.1:1", "vm", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 5
    assert "cannot reach corral" in down.stderr
