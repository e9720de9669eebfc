"""Placement on a real 3-server cluster (fake driver): anti-affinity groups, `vm why`, dry runs,
capacity, drain with blockers, progress and cancel, and no oversubscription under a burst of
concurrent creates (checked from the state afterwards).

Real agent processes and etcd members on 127.0.0.1-3; the CLI runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.harness import AgentProcess, node_states, token, wait_for

pytestmark = pytest.mark.integration

NODES = ("n1", "n2", "n3")
# vCPUs each host may carry in these tests: 2 host CPUs (or however many) times this ratio is
# not known in advance, so every test sets each node's capacity explicitly.
CPU = "cpu_allocation_ratio"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProcess]]:
    base = tmp_path_factory.mktemp("placement")
    agents: dict[str, AgentProcess] = {}
    env = {
        "CORRAL_FAKE_START_DELAY_S": "0.05",
        "CORRAL_FAKE_STOP_DELAY_S": "0.05",
        "CORRAL_FAKE_MIGRATE_DELAY_S": "0.3",
    }
    try:
        n1 = AgentProcess(
            base / "n1", name="n1", bind="127.0.0.1", env=env, extra_args=["--label", "zone=z1"]
        ).start()
        agents["n1"] = n1
        t = token(n1, uses=5)
        for i, name in ((2, "n2"), (3, "n3")):
            a = AgentProcess(
                base / name,
                name=name,
                bind=f"127.0.0.{i}",
                env=env,
                extra_args=["--label", f"zone=z{i}", *n1.join_args(t)],
            )
            agents[name] = a
            a.start(bootstrap=False, timeout_s=90)
        wait_for(lambda: node_states(n1) == dict.fromkeys(NODES, "ready"), 60, "3 ready nodes")
        yield agents
    finally:
        for a in agents.values():
            try:
                a.stop()
            except AssertionError:
                a.kill()


def cli(agent: AgentProcess, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "corral", "--addr", agent.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert done.returncode == 0, done.stderr + done.stdout
    return done


def api(agent: AgentProcess) -> httpx.Client:
    return agent.client(timeout=30.0)


def get(agent: AgentProcess, path: str, **params: Any) -> Any:
    r = httpx.get(agent.url + path, params=params.get("params"), timeout=90)
    assert r.status_code == 200, r.text
    return r


def vms(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cursor = None
    with api(agent) as c:
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/api/v1/vms", params=params).json()
            out.update({v["name"]: v for v in page["items"]})
            cursor = page["next_cursor"]
            if not cursor:
                return out


def delete_all(agent: AgentProcess) -> None:
    with api(agent) as c:
        for name in vms(agent):
            c.delete(f"/api/v1/vms/{name}")
    try:
        wait_for(lambda: not vms(agent), 60, "every vm deleted")
    except AssertionError:
        left = {n: (v["status"], v.get("deleting")) for n, v in vms(agent).items()}
        raise AssertionError(f"left: {left}") from None


def set_nodes(agent: AgentProcess, **spec: Any) -> dict[str, int]:
    """Patch every node's spec; returns each node's vCPU capacity (cpus x ratio)."""
    caps = {}
    with api(agent) as c:
        for n in NODES:
            r = c.patch(f"/api/v1/nodes/{n}", json=spec)
            assert r.status_code == 200, r.text
            node = r.json()
            ratio = node["spec"][CPU] or 128
            caps[n] = int(
                (node["status"]["inventory"]["cpus"] - node["spec"]["reserved_vcpus"]) * ratio
            )
    return caps


@pytest.fixture
def clean(cluster: dict[str, AgentProcess]) -> Iterator[AgentProcess]:
    n1 = cluster["n1"]
    set_nodes(n1, cordoned=False, maintenance=False, **{CPU: None})
    yield n1
    delete_all(n1)
    with api(n1) as c:
        for g in c.get("/api/v1/groups").json()["items"]:
            c.delete(f"/api/v1/groups/{g['name']}")
    set_nodes(n1, cordoned=False, maintenance=False, **{CPU: None})


def test_anti_affinity_group_one_per_host_fourth_pending_and_drain(clean: AgentProcess) -> None:
    n1 = clean
    out = cli(n1, "group", "create", "web", "--anti-affinity", "--max-per-node", "1").stdout
    assert "group web created (anti-affinity, max 1 per node)" in out
    for i in range(3):
        cli(n1, "vm", "create", f"web-{i}", "--group", "web", "--memory", "64M")
    placed = {v["status"]["node"] for v in vms(n1).values()}
    assert placed == set(NODES), "one member per host"

    # A 4th member fits nowhere: it stays pending, and says why (per host).
    cli(n1, "vm", "create", "web-3", "--group", "web", "--memory", "64M", "--no-wait")
    wait_for(lambda: "anti-affinity" in vms(n1)["web-3"]["status"]["message"], 20, "pending reason")
    assert vms(n1)["web-3"]["status"]["state"] == "pending"
    why = cli(n1, "vm", "why", "web-3").stdout
    assert "vm web-3 is pending on no node" in why
    for n in NODES:
        assert n in why
    assert why.count("anti-affinity") >= 3, why
    data = get(n1, "/api/v1/vms/web-3/placement").json()
    rows = {r["node"]: r for r in data["plan"]["nodes"]}
    assert {r["filter"] for r in rows.values()} == {"anti-affinity"}
    assert all(r["outcome"] == "rejected" for r in rows.values())

    # A placed member: chosen host with its scores, the others rejected by anti-affinity.
    web0 = vms(n1)["web-0"]
    data = get(n1, "/api/v1/vms/web-0/placement").json()
    chosen = [r for r in data["plan"]["nodes"] if r["outcome"] == "chosen"]
    assert [r["node"] for r in chosen] == [web0["status"]["node"]]
    assert chosen[0]["scores"]["spread"] > 0

    # Draining web-0's host: web-0 fits nowhere else (anti-affinity) -> reported as a blocker
    # before anything starts, and nothing changes.
    host = web0["status"]["node"]
    refused = cli(n1, "node", "drain", host, ok=False)
    assert refused.returncode == 4, refused.stderr
    assert "web-0" in refused.stderr and "anti-affinity" in refused.stderr
    node = get(n1, f"/api/v1/nodes/{host}").json()
    assert node["spec"]["cordoned"] is False

    # Forced: web-0 is stopped and goes pending, and `vm why` says the host is cordoned and
    # the others hold a member of its group.
    cli(n1, "node", "drain", host, "--force")
    web0 = vms(n1)["web-0"]
    assert web0["status"]["node"] is None and web0["status"]["state"] == "pending"
    wait_for(
        lambda: "cordoned" in get(n1, "/api/v1/vms/web-0/placement").json()["message"],
        20,
        "web-0 explained",
    )
    why = cli(n1, "vm", "why", "web-0").stdout
    assert "cordoned" in why and "anti-affinity" in why

    # Undrain: capacity appears, and a pending member is placed on the host at once.
    cli(n1, "node", "undrain", host)
    wait_for(
        lambda: any(
            v["status"]["node"] == host for n, v in vms(n1).items() if n in ("web-0", "web-3")
        ),
        20,
        "a pending member placed on the undrained host",
    )


def test_dry_run_and_capacity(clean: AgentProcess) -> None:
    n1 = clean
    caps = set_nodes(n1, **{CPU: 2.0})
    with api(n1) as c:
        r = c.post("/api/v1/vms", params={"dry_run": "true"}, json={"name": "d1", "vcpus": 1})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["would"] == "place" and answer["node"] in NODES
        assert c.get("/api/v1/vms/d1").status_code == 404, "a dry run creates nothing"
        r = c.post(
            "/api/v1/vms",
            params={"dry_run": "true"},
            json={"name": "d2", "vcpus": 1, "node_selector": {"zone": "z3"}},
        )
        assert r.json()["node"] == "n3"
        rows = {x["node"]: x for x in r.json()["placement"]["nodes"]}
        assert rows["n1"]["filter"] == "labels" and rows["n2"]["filter"] == "labels"
        r = c.post("/api/v1/vms", params={"dry_run": "true"}, json={"name": "d3", "group": "nope"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "group"

        cap = c.get("/api/v1/capacity", params={"vcpus": 1, "memory_mib": 64}).json()
        assert cap["total"] == sum(caps.values())
        assert {x["node"]: x["fits"] for x in cap["nodes"]} == caps
        nk = c.get(
            "/api/v1/capacity", params={"vcpus": 1, "memory_mib": 64, "tolerate_failures": 1}
        ).json()
        # N+1: keep one (the biggest) host's worth free.
        assert nk["total_tolerating_failures"] == sum(caps.values()) - max(caps.values())
    out = cli(n1, "vm", "create", "d4", "--dry-run", "--node-selector", "zone=z2").stdout
    assert "placing vm d4 on node n2" in out and "nothing was created" in out
    out = cli(n1, "cluster", "capacity", "--vcpus", "1", "-m", "64M", "--tolerate-failures", "1")
    assert f"total: {sum(caps.values())} vms" in out.stdout


def test_200_concurrent_creates_never_oversubscribe(
    cluster: dict[str, AgentProcess], clean: AgentProcess
) -> None:
    n1 = clean
    caps = set_nodes(n1, **{CPU: 20.0})
    total = sum(caps.values())
    assert total < 200, caps

    # 200 creates spread over the three servers' APIs, all at once.
    async def all_servers() -> list[int]:
        parts = [_burst(cluster[n].url, n, k) for n, k in zip(NODES, (67, 67, 66), strict=True)]
        return [s for part in await asyncio.gather(*parts) for s in part]

    statuses = asyncio.run(all_servers())
    assert statuses.count(202) == 200, statuses
    wait_for(
        lambda: sum(1 for v in vms(n1).values() if v["status"]["node"]) == total,
        60,
        "every slot filled",
    )
    time.sleep(2)  # let more passes run: nothing else may be placed
    state = vms(n1)
    used: dict[str, int] = {}
    for v in state.values():
        if v["status"]["node"]:
            used[v["status"]["node"]] = used.get(v["status"]["node"], 0) + v["spec"]["vcpus"]
    assert used == caps, f"placed {used}, capacity {caps}"
    pending = [v for v in state.values() if v["status"]["node"] is None]
    assert len(pending) == 200 - total
    assert all("insufficient vcpus" in v["status"]["message"] for v in pending)


async def _burst(url: str, prefix: str, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def one(i: int) -> int:
            r = await c.post(
                "/api/v1/vms", json={"name": f"{prefix}-{i}", "vcpus": 1, "memory_mib": 64}
            )
            return r.status_code

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_drain_moves_every_vm_with_progress_and_cancel_stops_it(clean: AgentProcess) -> None:
    n1 = clean
    with api(n1) as c:
        # Only n1 takes VMs while they are created: 10 VMs there.
        for n in ("n2", "n3"):
            c.post(f"/api/v1/nodes/{n}/cordon")
        for i in range(10):
            assert (
                c.post("/api/v1/vms", json={"name": f"d-{i}", "memory_mib": 64}).status_code == 202
            )
        wait_for(
            lambda: sum(1 for v in vms(n1).values() if v["status"]["state"] == "running") == 10,
            30,
            "10 running vms on n1",
        )
        before = vms(n1)
        assert {v["status"]["node"] for v in before.values()} == {"n1"}
        booted = {n: v["status"]["started_at"] for n, v in before.items()}
        assert all(booted.values())
        for n in ("n2", "n3"):
            c.post(f"/api/v1/nodes/{n}/uncordon")

        # Drain one move at a time; watch progress, then cancel part-way.
        r = c.post("/api/v1/nodes/n1/drain", json={"concurrency": 1})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["object"]["spec"]["cordoned"] is True
        assert len(body["plan"]["moves"]) == 10 and body["plan"]["blockers"] == []
        task_id = body["task"]["id"]
        seen: list[float] = []

        def some_moved() -> bool:
            t = c.get(f"/api/v1/tasks/{task_id}").json()
            seen.append(t["status"]["progress"])
            return t["status"]["progress"] >= 0.3

        wait_for(some_moved, 30, "a third of the drain done", poll_s=0.05)
        r = c.post(f"/api/v1/tasks/{task_id}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        task = c.get(f"/api/v1/tasks/{task_id}", params={"wait": "true", "timeout": 30}).json()
        assert task["status"]["state"] == "cancelled", task["status"]
        moved = [
            v for v, m in task["status"]["result"]["moves"].items() if m["state"] == "succeeded"
        ]
        assert 3 <= len(moved) < 10
        time.sleep(1.5)  # no further move starts after the cancel
        on_n1 = [n for n, v in vms(n1).items() if v["status"]["node"] == "n1"]
        assert len(on_n1) == 10 - len(moved)
        assert seen == sorted(seen), "progress never goes back"

        # Drain again to the end: every VM leaves n1 and runs elsewhere.
        r = c.post("/api/v1/nodes/n1/drain", json={"concurrency": 3})
        assert r.status_code == 202, r.text
        task = c.get(
            f"/api/v1/tasks/{r.json()['task']['id']}", params={"wait": "true", "timeout": 60}
        ).json()
        assert task["status"]["state"] == "succeeded", task["status"]
        assert task["status"]["progress"] == 1.0
        state = vms(n1)
        assert all(v["status"]["node"] in ("n2", "n3") for v in state.values())
        wait_for(
            lambda: all(v["status"]["state"] == "running" for v in vms(n1).values()),
            30,
            "all running after the drain",
        )
        # Every VM moved live: the same boot (started_at) on its new host, none restarted.
        after = vms(n1)
        assert {n: v["status"]["started_at"] for n, v in after.items()} == booted
        moves = task["status"]["result"]["moves"]
        assert all(m["handle"].startswith("live:") for m in moves.values()), moves
        # The allocation records (what capacity counts) match the VMs on each host.
        cap = c.get("/api/v1/capacity", params={"vcpus": 1, "memory_mib": 64}).json()
        used = {row["node"]: row["memory_mib"]["used"] for row in cap["nodes"]}
        for node in NODES:
            here = sum(
                v["spec"]["memory_mib"] for v in after.values() if v["status"]["node"] == node
            )
            assert used[node] == here, (node, used, here)
        # Maintenance needs an empty host: n1 now is.
        assert c.post("/api/v1/nodes/n1/maintenance/on").status_code == 200
        assert c.post("/api/v1/nodes/n2/maintenance/on").status_code == 409
        assert c.post("/api/v1/nodes/n1/maintenance/off").json()["spec"]["cordoned"] is False


def test_rebalance_plan_and_apply(clean: AgentProcess) -> None:
    n1 = clean
    caps = set_nodes(n1, **{CPU: 8.0})
    assert min(caps.values()) >= 12, caps
    with api(n1) as c:
        for n in ("n2", "n3"):
            c.post(f"/api/v1/nodes/{n}/cordon")
        for i in range(6):
            c.post("/api/v1/vms", json={"name": f"r-{i}", "vcpus": 2, "memory_mib": 64})
        wait_for(
            lambda: sum(1 for v in vms(n1).values() if v["status"]["state"] == "running") == 6,
            30,
            "6 running on n1",
        )
        for n in ("n2", "n3"):
            c.post(f"/api/v1/nodes/{n}/uncordon")
    out = cli(n1, "cluster", "rebalance", "--plan", "--max-moves", "4").stdout
    assert "imbalance" in out and "->" in out and "n1" in out
    out = cli(n1, "cluster", "rebalance", "--apply", "--max-moves", "4").stdout
    task_id = out.strip().split()[-1]
    task = get(n1, f"/api/v1/tasks/{task_id}", params={"wait": "true", "timeout": 60}).json()
    assert task["status"]["state"] == "succeeded", task["status"]
    nodes = {v["status"]["node"] for v in vms(n1).values()}
    assert len(nodes) >= 2


def test_bad_input_names_the_field(clean: AgentProcess) -> None:
    with api(clean) as c:
        r = c.post("/api/v1/groups", json={"name": "g", "policy": "apart"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "policy"
        r = c.post("/api/v1/vms", json={"name": "x", "group": "missing"})
        assert r.status_code == 422 and "corral group create missing" in r.json()["detail"]
        r = c.patch("/api/v1/nodes/n1", json={"labels": {"a": "b"}})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "labels"
        r = c.post("/api/v1/vms", json={"name": "x", "priority": -1})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "priority"


def test_an_allocation_record_written_wrong_is_rebuilt_from_the_vms(clean: AgentProcess) -> None:
    """Capacity counts the allocation records. One rewritten behind the leader's back (here:
    claiming 64 GiB that no VM takes) is made to match the VMs placed on its host again by the
    leader's periodic resync, though no VM changed meanwhile."""
    from corral.daemon.identity import HostPki
    from corral.state import Put, Store, keys

    n1 = clean
    with api(n1) as c:
        r = c.post("/api/v1/vms", params={"wait": "true"}, json={"name": "al-1", "memory_mib": 64})
        assert r.status_code == 200, r.text
    host = vms(n1)["al-1"]["status"]["node"]

    def used() -> int:
        cap = get(n1, "/api/v1/capacity", params={"vcpus": 1, "memory_mib": 64}).json()
        return int({row["node"]: row["memory_mib"]["used"] for row in cap["nodes"]}[host])

    assert used() == 64

    async def write_wrong() -> None:
        store = Store(
            [f"https://{n1.bind}:{n1.etcd_client_port}"],
            tls=HostPki(n1.data_dir).etcd_tls(),
        )
        try:
            bogus = b'{"vms":{"al-1":[1,64],"ghost":[1,65536]}}'
            await store.commit([Put(keys.alloc_key(host), bogus)])
        finally:
            await store.close()

    asyncio.run(write_wrong())
    assert used() == 64 + 65536
    wait_for(lambda: used() == 64, 30, "the allocation record rebuilt from the VMs")
