"""Console tickets and WebSockets against a real agent process with the fake driver: every way
a console is refused says why and what to do, over HTTP, over the WebSocket and in the CLI.
(Real consoles of real guests are in tests/e2e/test_console_qemu.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from corral.service.console_tickets import ConsoleTickets
from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.integration


def corral(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_ADDR": agent.url, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def vms(shared_agent: AgentProcess) -> dict[str, str]:
    """Two fake VMs, one running and one stopped: their ids by name."""
    ids = {}
    with shared_agent.client() as c:
        for name, power in (("fk-run", "running"), ("fk-off", "stopped")):
            r = c.post(
                "/api/v1/vms",
                params={"wait": "true", "timeout": "30"},
                json={"name": name, "memory_mib": 64, "power_state": power},
            )
            assert r.status_code == 200, r.text
            ids[name] = r.json()["object"]["id"]
    return ids


@pytest.fixture(scope="module")
def cluster_tickets(shared_agent: AgentProcess) -> ConsoleTickets:
    """Tickets signed like the cluster signs them (the key comes from the host's identity)."""
    identity = json.loads((shared_agent.data_dir / "cluster.json").read_text())
    return ConsoleTickets.from_secret(identity["gossip_key"])


def test_ticket_refusals_say_why(shared_agent: AgentProcess, vms: dict[str, str]) -> None:
    with shared_agent.client() as c:
        missing = c.post("/api/v1/vms/nope/console/ticket")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"

        fake = c.post("/api/v1/vms/fk-run/console/ticket", json={"console": "serial"})
        assert fake.status_code == 409
        assert "fake driver, which has no serial console" in fake.json()["detail"]

        stopped = c.post("/api/v1/vms/fk-off/console/ticket", json={"console": "vnc"})
        assert stopped.status_code == 409
        assert "fk-off is stopped" in stopped.json()["detail"]
        assert "corral vm start fk-off" in stopped.json()["detail"]

        bad = c.post("/api/v1/vms/fk-run/console/ticket", json={"console": "tty"})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "console"
        assert "serial, vnc" in bad.json()["errors"][0]["message"]

        unknown = c.post("/api/v1/vms/fk-run/console/ticket", json={"kind": "serial"})
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "kind"


async def closed_with(url: str) -> tuple[int, str]:
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 15)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


async def test_websocket_refusals_close_with_a_code_and_a_reason(
    shared_agent: AgentProcess, vms: dict[str, str], cluster_tickets: ConsoleTickets
) -> None:
    base = "ws://" + shared_agent.url.removeprefix("http://") + "/api/v1/vms"
    other_cluster = ConsoleTickets.from_secret("not-this-clusters-key")

    def url(vm: str, ticket: str | None, kind: str = "console") -> str:
        return f"{base}/{vm}/{kind}" + (f"?ticket={quote(ticket)}" if ticket else "")

    cases = [
        (url("fk-run", None), 1008, "ticket: required"),
        (
            url("fk-run", other_cluster.issue("fk-run", vms["fk-run"], "serial").token),
            1008,
            "ticket: bad signature",
        ),
        (
            url("fk-run", cluster_tickets.issue("fk-run", "an-older-id", "serial").token),
            1008,
            "ticket: issued for an earlier vm 'fk-run'",
        ),
        (
            url("fk-run", cluster_tickets.issue("fk-run", vms["fk-run"], "serial").token, "vnc"),
            1008,
            "ticket: issued for the serial console, not the vnc console",
        ),
        # A valid ticket, but the fake driver has no console to open.
        (
            url("fk-run", cluster_tickets.issue("fk-run", vms["fk-run"], "serial").token),
            4409,
            "vm fk-run runs on host n1 with the fake driver",
        ),
        (
            url("gone", cluster_tickets.issue("gone", "x", "vnc").token, "vnc"),
            4404,
            "",
        ),
    ]
    for target, code, reason in cases:
        got = await closed_with(target)
        assert got[0] == code and got[1].startswith(reason), (target, got)
        if code == 1008:
            assert "POST /api/v1/vms/" in got[1], "a ticket refusal says how to get a new one"


def test_the_cli_exits_with_the_documented_codes(
    shared_agent: AgentProcess, vms: dict[str, str]
) -> None:
    missing = corral(shared_agent, "vm", "console", "nope")
    assert missing.returncode == 3, missing.stderr
    assert "nope" in missing.stderr

    fake = corral(shared_agent, "vm", "console", "fk-run")
    assert fake.returncode == 4
    assert "fake driver, which has no serial console" in " ".join(fake.stderr.split())

    stopped = corral(shared_agent, "vm", "console", "fk-off", "--ticket-only", "-o", "json")
    assert stopped.returncode == 4 and "corral vm start fk-off" in " ".join(stopped.stderr.split())

    vnc = corral(shared_agent, "vm", "console", "fk-run", "--vnc")
    assert vnc.returncode == 2 and "--ticket-only" in vnc.stderr

    unreachable = corral(shared_agent, "--addr", "127.0.0.1:1", "vm", "console", "fk-run")
    assert unreachable.returncode == 5
    assert "cannot reach corral" in unreachable.stderr


def test_the_log_still_works_without_a_ticket(
    shared_agent: AgentProcess, vms: dict[str, str]
) -> None:
    r = httpx.get(f"{shared_agent.url}/api/v1/vms/fk-run/console/log", timeout=10)
    assert r.status_code == 404 and "fake driver" in r.json()["detail"]
