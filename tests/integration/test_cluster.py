"""A multi-host cluster on 127.0.0.x: joins, etcd learners, gossip, failover, frozen hosts.

Real agent processes, real etcd members, real serf agents.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.integration.harness import AgentProcess, node_states, token, wait_for

pytestmark = pytest.mark.integration

MakeAgent = Callable[..., AgentProcess]
FAST = ["--lease-ttl-s", "6", "--leader-ttl-s", "4", "--node-down-after-s", "20"]


def members(agent: AgentProcess) -> dict[str, str]:
    info = httpx.get(agent.url + "/api/v1/cluster", timeout=10).json()
    return {m["name"]: ("learner" if m["is_learner"] else "voter") for m in info["members"]}


@pytest.fixture
def cluster(make_agent: MakeAgent) -> Iterator[dict[str, AgentProcess]]:
    """n1 (bootstrap, desired_voters=1), n2 and n3 servers, c1 compute-only."""
    n1 = make_agent("n1", bind="127.0.0.1", extra_args=[*FAST, "--desired-voters", "1"]).start()
    t = token(n1, uses=5)
    n2 = make_agent("n2", bind="127.0.0.2", extra_args=[*FAST, *n1.join_args(t)])
    n2.start(bootstrap=False)
    # desired_voters=1: n2 stays a learner, a standby.
    wait_for(lambda: node_states(n1).get("n2") == "ready", 30, "n2 ready")
    time.sleep(3)  # several membership passes
    assert members(n1) == {"n1": "voter", "n2": "learner"}
    r = httpx.patch(n1.url + "/api/v1/cluster", json={"desired_voters": 3}, timeout=10)
    assert r.status_code == 200, r.text
    wait_for(lambda: members(n1) == {"n1": "voter", "n2": "voter"}, 60, "n2 promoted")
    n3 = make_agent("n3", bind="127.0.0.3", extra_args=[*FAST, *n2.join_args(t)])
    n3.start(bootstrap=False, timeout_s=90)
    c1 = make_agent("c1", bind="127.0.0.4", extra_args=[*FAST, "--no-server", *n3.join_args(t)])
    c1.start(bootstrap=False)
    wait_for(
        lambda: node_states(n1) == dict.fromkeys(["c1", "n1", "n2", "n3"], "ready"),
        30,
        "4 ready nodes",
    )
    yield {"n1": n1, "n2": n2, "n3": n3, "c1": c1}


def test_hosts_join_learners_wait_and_are_promoted(cluster: dict[str, AgentProcess]) -> None:
    n1, c1 = cluster["n1"], cluster["c1"]
    wait_for(
        lambda: members(n1) == dict.fromkeys(["n1", "n2", "n3"], "voter"),
        60,
        "n3 promoted: voters are fewer than desired_voters=3",
    )
    nodes = {n["name"]: n for n in httpx.get(n1.url + "/api/v1/nodes").json()["items"]}
    assert nodes["c1"]["spec"]["roles"] == ["compute"]
    assert nodes["n2"]["spec"]["roles"] == ["server", "compute"]
    wait_for(
        lambda: all(
            n["status"]["gossip"] == "alive"
            for n in httpx.get(n1.url + "/api/v1/nodes").json()["items"]
        ),
        20,
        "every node alive in gossip",
    )
    # The compute host answers the API too (forwarding to a server) but is no etcd member.
    via_compute = httpx.get(c1.url + "/api/v1/cluster", timeout=10).json()
    assert via_compute["leader"]["node"] == "n1"
    assert not (c1.data_dir / "etcd").exists()


def test_bad_join_tokens_are_refused(make_agent: MakeAgent) -> None:
    n1 = make_agent("n1", bind="127.0.0.1").start()
    good = token(n1, uses=1)
    revoked = token(n1)
    assert httpx.post(f"{n1.url}/api/v1/tokens/{revoked.split('.')[0]}/revoke").status_code == 200
    short = token(n1, ttl_s=1)
    time.sleep(1.5)
    token_id = good.split(".")[0]
    cases = {
        "wrong": f"{token_id}.not-the-secret",
        "unknown": "deadbeef.whatever",
        "expired": short,
        "revoked": revoked,
        "garbage": "no-dot-at-all",
    }
    answers = set()
    for why, presented in cases.items():
        joiner = make_agent(f"x-{why}", bind="127.0.0.5", extra_args=n1.join_args(presented))
        joiner.data_dir.mkdir(parents=True)
        result = subprocess.run(
            joiner.command(bootstrap=False), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, (why, result.stderr)
        assert "refused the join (401)" in result.stderr, (why, result.stderr)
        answers.add(result.stderr.strip().splitlines()[-1])
    assert len(answers) == 1, "refusals must not reveal which tokens exist"
    # A single-use token works once.
    first = make_agent("c1", bind="127.0.0.6", extra_args=["--no-server", *n1.join_args(good)])
    first.start(bootstrap=False)
    again = make_agent("c2", bind="127.0.0.7", extra_args=["--no-server", *n1.join_args(good)])
    again.data_dir.mkdir(parents=True)
    result = subprocess.run(
        again.command(bootstrap=False), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "401" in result.stderr
    assert sorted(node_states(n1)) == ["c1", "n1"]
    listed = httpx.get(n1.url + "/api/v1/tokens").json()["items"]
    assert all("secret" not in t and "secret_hash" not in t for t in listed)


def test_leader_failover_keeps_every_acknowledged_write(
    cluster: dict[str, AgentProcess],
) -> None:
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    wait_for(lambda: members(n1) == dict.fromkeys(["n1", "n2", "n3"], "voter"), 60, "3 voters")
    placed = {}
    with httpx.Client(base_url=n2.url, timeout=30) as c:
        for i in range(100):
            r = c.post("/api/v1/vms", json={"name": f"f-{i:03d}", "memory_mib": 64})
            assert r.status_code == 202, r.text

        def all_running() -> bool:
            items = c.get("/api/v1/vms", params={"limit": 1000}).json()["items"]
            placed.update({v["name"]: v["status"]["node"] for v in items})
            return len(items) == 100 and all(v["status"]["state"] == "running" for v in items)

        wait_for(all_running, 120, "100 VMs running")
    assert set(placed.values()) == {"n1", "n2", "n3", "c1"}, "VMs spread over the 4 hosts"
    leader = httpx.get(n2.url + "/api/v1/cluster").json()["leader"]["node"]
    victim = cluster[leader]
    survivor = n3 if leader != "n3" else n2
    killed_at = time.monotonic()
    victim.kill()

    def write_accepted() -> bool:
        r = httpx.post(
            survivor.url + "/api/v1/vms",
            json={"name": "after-failover", "memory_mib": 64},
            timeout=3,
        )
        return r.status_code in (202, 409)

    wait_for(write_accepted, 30, "a write accepted after the leader died")
    took = time.monotonic() - killed_at

    def new_leader() -> str | None:
        info = httpx.get(survivor.url + "/api/v1/cluster", timeout=3).json()["leader"]
        return info["node"] if info and info["node"] != leader else None

    elected = wait_for(new_leader, 30, "a new leader")
    took_leader = time.monotonic() - killed_at
    print(
        f"\nleader {leader} SIGKILLed: first write accepted after {took:.1f}s, "
        f"{elected} elected after {took_leader:.1f}s (leader ttl 4s)"
    )
    # The new leader acts: the VM written after the failover is placed and started.
    wait_for(
        lambda: (
            httpx.get(survivor.url + "/api/v1/vms/after-failover").json()["status"]["state"]
            == "running"
        ),
        30,
        "the new leader to place the VM created after the failover",
    )
    items = httpx.get(survivor.url + "/api/v1/vms", params={"limit": 1000}).json()["items"]
    after = {v["name"]: v["status"]["node"] for v in items if v["name"].startswith("f-")}
    assert after == placed
    # The old host comes back and catches up.
    victim.start(bootstrap=False, timeout_s=90)
    wait_for(
        lambda: httpx.get(victim.url + "/api/v1/vms/after-failover").status_code == 200,
        30,
        "the restarted host to see writes made while it was dead",
    )
    wait_for(lambda: node_states(survivor)[leader] == "ready", 30, "old leader ready again")


def test_a_frozen_host_goes_down_and_comes_back(cluster: dict[str, AgentProcess]) -> None:
    n1, c1 = cluster["n1"], cluster["c1"]
    assert c1.proc is not None
    serf_pids = subprocess.run(
        ["pgrep", "-P", str(c1.proc.pid), "-x", "serf"], capture_output=True, text=True
    ).stdout.split()
    frozen = [c1.proc.pid, *map(int, serf_pids)]
    started = time.monotonic()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: node_states(n1)["c1"] in ("not-ready", "unreachable", "down"),
            20,
            "c1 not ready",
        )
        wait_for(lambda: node_states(n1)["c1"] == "down", 30, "c1 down")
        print(f"\nhost frozen: down after {time.monotonic() - started:.1f}s (lease ttl 6s)")
        node = httpx.get(n1.url + "/api/v1/nodes/c1").json()
        assert node["status"]["gossip"] in ("failed", "left")
        assert "liveness lease" in node["status"]["message"]
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: node_states(n1)["c1"] == "ready", 30, "c1 ready again")


def test_a_dead_server_is_replaced_by_promoting_a_standby(make_agent: MakeAgent) -> None:
    """3 voters and a learner standby; a voter's host dies for good: after the grace period its
    member is removed and the standby promoted, and the cluster keeps taking writes."""
    grace = ["--server-dead-grace-s", "5"]
    n1 = make_agent("n1", bind="127.0.0.1", extra_args=[*FAST, *grace]).start()
    t = token(n1, uses=5)
    agents = {"n1": n1}
    for i in (2, 3, 4):
        a = make_agent(f"n{i}", bind=f"127.0.0.{i}", extra_args=[*FAST, *n1.join_args(t)])
        a.start(bootstrap=False, timeout_s=120)
        agents[f"n{i}"] = a
        if i < 4:
            wait_for(
                lambda i=i: members(n1) == {f"n{k}": "voter" for k in range(1, i + 1)},
                90,
                f"n{i} promoted",
            )
    # desired_voters=3 reached: n4 stays a learner, a standby ready to take over.
    wait_for(lambda: node_states(n1).get("n4") == "ready", 60, "n4 ready")
    time.sleep(3)
    assert members(n1) == {"n1": "voter", "n2": "voter", "n3": "voter", "n4": "learner"}

    agents["n3"].kill()
    wait_for(
        lambda: members(n1) == {"n1": "voter", "n2": "voter", "n4": "voter"},
        120,
        "n3's member removed and the standby n4 promoted",
    )
    r = httpx.post(n1.url + "/api/v1/vms", json={"name": "after-1"}, timeout=30)
    assert r.status_code == 202, r.text
