"""Hosts leaving for good: ``corral agent --leave`` and ``corral node remove`` (DELETE node).

Real agents on 127.0.0.x, real etcd members: a server that leaves takes its etcd member with
it, a running host cannot be removed from under itself, nor can a host that still holds VMs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.integration.harness import AgentProcess, node_states, token, wait_for

pytestmark = pytest.mark.integration

MakeAgent = Callable[..., AgentProcess]
FAST = ["--lease-ttl-s", "6", "--leader-ttl-s", "4", "--node-down-after-s", "20"]
SERVERS = ("n1", "n2", "n3")


def members(agent: AgentProcess) -> dict[str, tuple[str, bool]]:
    """etcd members by name: (voter or learner, healthy)."""
    info = httpx.get(agent.url + "/api/v1/cluster", timeout=10).json()
    return {
        m["name"]: ("learner" if m["is_learner"] else "voter", m["healthy"])
        for m in info["members"]
    }


def write_runs(agent: AgentProcess, name: str) -> str:
    """Create a VM through ``agent``; return the node it runs on."""
    r = httpx.post(agent.url + "/api/v1/vms", json={"name": name, "memory_mib": 64}, timeout=10)
    assert r.status_code == 202, r.text

    def running_on() -> str | None:
        status = httpx.get(f"{agent.url}/api/v1/vms/{name}", timeout=5).json()["status"]
        return status["node"] if status["state"] == "running" else None

    node: str = wait_for(running_on, 30, f"vm {name} running")
    return node


def three_servers(make_agent: MakeAgent, n3_args: list[str]) -> dict[str, AgentProcess]:
    """n1 (bootstrap, desired_voters=3), n2 and n3 joined: three healthy etcd voters."""
    n1 = make_agent("n1", bind="127.0.0.1", extra_args=[*FAST, "--desired-voters", "3"]).start()
    t = token(n1, uses=2)
    n2 = make_agent("n2", bind="127.0.0.2", extra_args=[*FAST, *n1.join_args(t)])
    n2.start(bootstrap=False, timeout_s=90)
    n3 = make_agent("n3", bind="127.0.0.3", extra_args=[*FAST, *n3_args, *n1.join_args(t)])
    n3.start(bootstrap=False, timeout_s=90)
    wait_for(lambda: members(n1) == dict.fromkeys(SERVERS, ("voter", True)), 60, "3 healthy voters")
    wait_for(lambda: node_states(n1) == dict.fromkeys(SERVERS, "ready"), 30, "3 ready nodes")
    return {"n1": n1, "n2": n2, "n3": n3}


@pytest.fixture
def leaving_cluster(make_agent: MakeAgent) -> Iterator[dict[str, AgentProcess]]:
    yield three_servers(make_agent, ["--leave"])


@pytest.fixture
def plain_cluster(make_agent: MakeAgent) -> Iterator[dict[str, AgentProcess]]:
    yield three_servers(make_agent, [])


def test_a_server_started_with_leave_takes_its_etcd_member_with_it(
    leaving_cluster: dict[str, AgentProcess],
) -> None:
    n1, n2, n3 = leaving_cluster["n1"], leaving_cluster["n2"], leaving_cluster["n3"]
    stopped_at = time.monotonic()
    assert n3.stop() == 0, n3.tail()
    exit_s = time.monotonic() - stopped_at
    wait_for(lambda: node_states(n1)["n3"] == "left", 10, "n3 left")
    left_s = time.monotonic() - stopped_at
    wait_for(lambda: "n3" not in members(n1), 10, "n3's etcd member removed")
    gone_s = time.monotonic() - stopped_at
    print(
        f"\nn3 (--leave) exited {exit_s:.1f}s after SIGTERM; left after {left_s:.1f}s, "
        f"etcd member gone after {gone_s:.1f}s"
    )
    node = httpx.get(n1.url + "/api/v1/nodes/n3", timeout=10).json()
    assert node["status"]["state"] == "left"
    assert node["status"]["gossip"] == "left"
    # The two others stay healthy voters, and the cluster goes on taking writes.
    assert members(n2) == {"n1": ("voter", True), "n2": ("voter", True)}
    assert write_runs(n2, "after-leave") in ("n1", "n2")
    assert node_states(n2) == {"n1": "ready", "n2": "ready", "n3": "left"}


def test_node_remove_is_refused_while_the_host_runs_and_works_once_it_is_stopped(
    plain_cluster: dict[str, AgentProcess],
) -> None:
    n1, n3 = plain_cluster["n1"], plain_cluster["n3"]
    r = httpx.delete(n1.url + "/api/v1/nodes/n3", timeout=10)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    detail = r.json()["detail"]
    # The refusal says what to do instead.
    assert "running" in detail and "--leave" in detail and "stop" in detail, detail
    assert node_states(n1)["n3"] == "ready"
    assert "n3" in members(n1)

    assert n3.stop() == 0, n3.tail()  # a plain stop: the host may come back
    stopped_at = time.monotonic()
    state = wait_for(
        lambda: node_states(n1)["n3"] if node_states(n1)["n3"] != "ready" else None,
        20,
        "n3 no longer ready",
    )
    assert state in ("not-ready", "unreachable", "down")
    assert "n3" in members(n1), "a stopped server keeps its etcd member until it is removed"
    r = httpx.delete(n1.url + "/api/v1/nodes/n3", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["status"]["state"] == "left"
    removed_at = time.monotonic()
    wait_for(lambda: "n3" not in members(n1), 10, "n3's etcd member removed by the leader")
    print(
        f"\nn3 {state} {removed_at - stopped_at:.1f}s after it stopped; its etcd member gone "
        f"{time.monotonic() - removed_at:.1f}s after the removal"
    )
    assert node_states(n1)["n3"] == "left"
    assert members(n1) == {"n1": ("voter", True), "n2": ("voter", True)}
    assert write_runs(n1, "after-remove") in ("n1", "n2")


def stopped_host_with_vms(make_agent: MakeAgent) -> tuple[AgentProcess, list[str]]:
    """n1 (server) and c1 (compute-only) with VMs on both; c1's agent then stopped.

    Returns n1 and the names of the VMs placed on c1.
    """
    n1 = make_agent("n1", bind="127.0.0.1", extra_args=[*FAST, "--desired-voters", "1"]).start()
    t = token(n1, uses=1, role="compute")
    c1 = make_agent("c1", bind="127.0.0.4", extra_args=[*FAST, "--no-server", *n1.join_args(t)])
    c1.start(bootstrap=False)
    wait_for(lambda: node_states(n1) == {"n1": "ready", "c1": "ready"}, 30, "2 ready nodes")
    hosts = {write_runs(n1, f"keep-{i}") for i in range(4)}
    assert hosts == {"n1", "c1"}, "VMs spread over both hosts"
    on_c1 = vms_on(n1, "c1")
    assert c1.stop() == 0, c1.tail()
    wait_for(lambda: node_states(n1)["c1"] != "ready", 20, "c1 no longer ready")
    return n1, on_c1


def vms_on(agent: AgentProcess, node: str) -> list[str]:
    r = httpx.get(agent.url + "/api/v1/vms", params={"node": node}, timeout=10)
    return sorted(v["name"] for v in r.json()["items"])


def test_a_host_that_holds_vms_cannot_be_removed(make_agent: MakeAgent) -> None:
    n1, on_c1 = stopped_host_with_vms(make_agent)
    r = httpx.delete(n1.url + "/api/v1/nodes/c1", timeout=10)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    detail = r.json()["detail"]
    for name in on_c1:
        assert name in detail, detail
    assert node_states(n1)["c1"] != "left"
    # Nothing was half-removed: its VMs are still recorded where they were.
    assert vms_on(n1, "c1") == on_c1


def test_a_dead_host_can_be_removed_once_its_vms_are_deleted(make_agent: MakeAgent) -> None:
    """The refusal says "delete or move them first": doing so must lead to the removal."""
    n1, on_c1 = stopped_host_with_vms(make_agent)
    wait_for(lambda: node_states(n1)["c1"] == "down", 30, "c1 down")
    for name in on_c1:
        r = httpx.delete(f"{n1.url}/api/v1/vms/{name}", timeout=10)
        assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while vms_on(n1, "c1") and time.monotonic() < deadline:
        time.sleep(0.5)
    stuck = {
        v["name"]: v["status"]["state"]
        for v in httpx.get(n1.url + "/api/v1/vms", params={"node": "c1"}, timeout=10).json()[
            "items"
        ]
    }
    assert not stuck, (
        f"the VMs of c1, a host that is down, are still there 30s after being deleted ({stuck}): "
        "their deletion waits for c1's agent to confirm, which never comes, so c1 can never "
        "be removed (product: control/vms.py VmLoop._delete)"
    )
    r = httpx.delete(n1.url + "/api/v1/nodes/c1", timeout=10)
    assert r.status_code == 200, r.text
    assert node_states(n1)["c1"] == "left"
