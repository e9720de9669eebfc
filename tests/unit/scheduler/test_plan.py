from __future__ import annotations

from corral.scheduler import NodeView, Request, Snapshot, schedule


def _node(name: str, **kw: object) -> NodeView:
    base: dict[str, object] = {
        "state": "ready",
        "roles": ("server", "compute"),
        "cpus": 4,
        "memory_mib": 4096,
    }
    base.update(kw)
    return NodeView(name=name, **base)  # type: ignore[arg-type]


def test_picks_the_least_loaded_node() -> None:
    snap = Snapshot((_node("n1", used_memory_mib=3000), _node("n2", used_memory_mib=100)))
    plan = schedule(snap, Request("web-1", 1, 512))
    assert plan.node == "n2"
    assert plan.explain().startswith("placing vm web-1 on node n2")


def test_every_rejection_has_its_reason() -> None:
    snap = Snapshot(
        (
            _node("n1", state="not-ready"),
            _node("n2", used_memory_mib=4000),
            _node("n3", roles=("server",)),
            _node("n4", cpus=1, used_vcpus=4),
        ),
        cpu_allocation_ratio=4.0,
    )
    plan = schedule(snap, Request("big", 2, 512))
    assert plan.node is None
    assert plan.rejected == {
        "n1": "node is not ready (not-ready)",
        "n2": "insufficient memory (needs 512 MiB, 96 free)",
        "n3": "node does not have the compute role",
        "n4": "insufficient vcpus (needs 2, 0 free)",
    }
    assert "cannot be placed" in plan.explain()


def test_memory_overcommit_ratio_is_honoured() -> None:
    node = _node("n1", memory_mib=1000, used_memory_mib=1000)
    assert schedule(Snapshot((node,)), Request("a", 1, 500)).node is None
    assert (
        schedule(Snapshot((node,), memory_allocation_ratio=1.5), Request("a", 1, 500)).node == "n1"
    )


def test_empty_cluster() -> None:
    plan = schedule(Snapshot(()), Request("a", 1, 64))
    assert plan.node is None and "no nodes" in plan.explain()


def test_rows_are_the_vm_why_table() -> None:
    from corral.scheduler import Scheduler

    snap = Snapshot(
        (
            _node("n1", used_memory_mib=1000),
            _node("n2"),
            _node("n3", state="down"),
            _node("n0", used_memory_mib=4096),
        )
    )
    plan = Scheduler(snap).schedule(Request("web-1", 1, 512))
    rows = plan.rows()
    assert [(r.node, r.outcome, r.filter) for r in rows] == [
        ("n2", "chosen", None),
        ("n1", "feasible", None),
        ("n0", "rejected", "memory"),
        ("n3", "rejected", "ready"),
    ]
    assert rows[0].total == plan.score and rows[0].scores == {"spread": plan.score}
    assert rows[3].reason == "node is not ready (down)"
    data = plan.as_dict()
    assert data["node"] == "n2" and data["policy"] == "spread"
    assert data["nodes"][2] == {
        "node": "n0",
        "outcome": "rejected",
        "filter": "memory",
        "reason": "insufficient memory (needs 512 MiB, 0 free)",
        "scores": {},
        "total": None,
    }


def test_unplaceable_on_many_hosts_is_summarised_per_filter() -> None:
    nodes = [_node(f"n{i:02d}", used_memory_mib=4096) for i in range(8)]
    nodes += [_node("d1", state="down"), _node("d2", state="down")]
    text = schedule(Snapshot(tuple(nodes)), Request("big", 1, 512)).explain()
    assert text == (
        "vm big cannot be placed on any of 10 nodes: rejected 8 by memory "
        "(e.g. n00: insufficient memory (needs 512 MiB, 0 free)), "
        "2 by ready (e.g. d1: node is not ready (down))"
    )


def test_incremental_placements_match_a_fresh_snapshot() -> None:
    from corral.scheduler import Scheduler

    nodes = tuple(_node(f"n{i}", cpus=2, memory_mib=2048) for i in range(3))
    sched = Scheduler(Snapshot(nodes, cpu_allocation_ratio=1.0))
    placed: dict[str, list[int]] = {}
    for k in range(7):
        req = Request(f"vm{k}", 1, 512)
        plan = sched.schedule(req)
        if plan.node is None:
            break
        sched.place(req, plan.node)
        used = placed.setdefault(plan.node, [0, 0])
        used[0] += 1
        used[1] += 512
    # 3 hosts x 2 vCPUs: the 7th VM fits nowhere, and a fresh snapshot with the same usage
    # gives the same answer.
    assert plan.node is None
    assert sorted(placed.values()) == [[2, 1024]] * 3
    fresh = Snapshot(
        tuple(
            _node(
                n.name,
                cpus=2,
                memory_mib=2048,
                used_vcpus=placed[n.name][0],
                used_memory_mib=placed[n.name][1],
            )
            for n in nodes
        ),
        cpu_allocation_ratio=1.0,
    )
    again = schedule(fresh, Request("vm6", 1, 512))
    assert again.rejected == plan.rejected


def test_a_bounded_plan_keeps_the_best_hosts_and_the_first_few_per_filter() -> None:
    from corral.scheduler import Scheduler

    nodes = [_node(f"f{i:02d}", used_memory_mib=100 * i) for i in range(12)]
    nodes += [_node(f"m{i:02d}", used_memory_mib=4096) for i in range(10)]
    nodes += [_node(f"d{i:02d}", state="down") for i in range(8)]
    plan = Scheduler(Snapshot(tuple(nodes))).schedule(Request("web-1", 1, 512))
    whole = plan.rows()
    kept = plan.rows(5)

    feasible = [r for r in whole if r.outcome != "rejected"]
    assert [r for r in kept if r.outcome != "rejected"] == feasible[:5]
    assert kept[0].outcome == "chosen" and kept[0].node == plan.node == "f00"
    rejected = [(r.node, r.filter) for r in kept if r.outcome == "rejected"]
    assert rejected == sorted(
        [(f"d{i:02d}", "ready") for i in range(5)] + [(f"m{i:02d}", "memory") for i in range(5)]
    )
    assert plan.omitted(5) == {"feasible": 7, "rejected": {"memory": 5, "ready": 3}}

    data = plan.as_dict(5)
    assert [r["node"] for r in data["nodes"]] == [r.node for r in kept]
    assert data["omitted"] == {"feasible": 7, "rejected": {"memory": 5, "ready": 3}}
    assert "omitted" not in plan.as_dict() and len(plan.as_dict()["nodes"]) == 30
    assert "omitted" not in plan.as_dict(12)  # 12 feasible, 10 and 8 rejected: all kept
    assert plan.rows(12) == whole
