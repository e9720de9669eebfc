"""`corral cluster status`, `corral node ls` and `corral node show`."""

from __future__ import annotations

from corral.client.testing import FakeCorralApi

from .support import Cli, json_out, kv, row_for, rows


def test_node_ls_shows_capacity_and_heartbeat(cli: Cli) -> None:
    result = cli("node", "ls")

    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert table[0] == [
        "NAME",
        "STATE",
        "ROLES",
        "GOSSIP",
        "CPUS",
        "MEMORY",
        "DISK FREE",
        "VMS",
        "HEARTBEAT",
    ]
    # n1 runs web-1 (2 vCPU, 512 MiB) and db-1 (4 vCPU, 4096 MiB); n2 runs web-2.
    assert table[1] == [
        "n1",
        "ready",
        "server,compute",
        "alive",
        "6/2",
        "4.5Gi/23.4Gi",
        "50.1Gi/80.5Gi",
        "2",
        "2m ago",
    ]
    assert table[2] == [
        "n2",
        "ready",
        "compute",
        "alive",
        "1/8",
        "1Gi/4Gi",
        "50.1Gi/80.5Gi",
        "1",
        "2m ago",
    ]


def test_node_ls_json_is_the_list_object(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("node", "ls", "-o", "json")
    assert result.exit_code == 0, result.output
    printed = json_out(result)
    assert [n["name"] for n in printed["items"]] == ["n1", "n2"]
    assert printed["items"][0] == fake.nodes["n1"]
    assert printed["next_cursor"] is None


def test_node_show(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("node", "show", "n2")

    assert result.exit_code == 0, result.output
    view = kv(result.stdout)
    assert view["State"] == "ready"
    assert view["Roles"] == "compute"
    assert view["Labels"] == "rack=b"
    assert view["Memory (allocated/total)"] == "1Gi/4Gi"
    assert view["Heartbeat"] == "2026-11-26T21:00:00Z (2m ago)"
    assert view["Address"] == fake.nodes["n2"]["status"]["address"]


def test_node_show_missing_exits_3(cli: Cli) -> None:
    result = cli("node", "show", "n9")
    assert result.exit_code == 3
    assert result.stderr.startswith("error: node n9 not found\n")


def test_cluster_status_shows_leader_revision_and_members(cli: Cli, fake: FakeCorralApi) -> None:
    fake.add_node("n3")
    fake.learners.add("n3")
    fake.term = 57
    fake.add_node("n4", state="down")

    result = cli("cluster", "status")

    assert result.exit_code == 0, result.output
    summary, members = result.stdout.split("\n\n")
    view = kv(summary)
    assert view["Cluster"] == f"corral {fake.cluster_id}"
    assert view["Leader"] == "n1 (since 2026-11-26T21:00:00Z, 2m ago)"
    assert view["Term"] == "57"
    assert view["Revision"] == str(fake.revision)
    assert view["Nodes"] == "3/4 ready"
    assert view["VMs"] == "2/3 running"
    table = rows(members)
    assert table[0][:5] == ["MEMBER", "ID", "ROLE", "HEALTH", "LEADER"]
    assert row_for(members, "n1")[2:5] == ["voter", "healthy", "*"]
    assert row_for(members, "n3")[2:5] == ["learner", "healthy", "-"]
    assert row_for(members, "n4")[2:5] == ["voter", "unhealthy", "-"]


def test_cluster_status_without_a_leader_says_so(cli: Cli, fake: FakeCorralApi) -> None:
    fake.nodes["n1"]["status"]["state"] = "down"
    result = cli("cluster", "status")
    assert result.exit_code == 0
    assert kv(result.stdout)["Leader"].startswith("none: the control plane has no leader")


def test_cluster_status_json(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("-o", "json", "cluster", "status")
    assert result.exit_code == 0, result.output
    printed = json_out(result)
    assert printed["kind"] == "cluster"
    assert printed["leader"]["node"] == "n1"
    assert printed["revision"] == fake.revision
