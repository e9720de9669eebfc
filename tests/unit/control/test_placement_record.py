"""The stored plan of a placement stays small however many hosts the cluster has."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from corral.cli.vm import omitted_line
from corral.control.placement import PLAN_ROWS_KEPT, placement_record
from corral.model import Vm, VmStatus
from corral.model.vm import VmCreate
from corral.scheduler import NodeView, Request, Scheduler, Snapshot


def _cluster(hosts: int) -> Snapshot:
    nodes = tuple(
        NodeView(
            name=f"hv-{i:04d}",
            state="ready" if i % 10 else "down",
            roles=("compute",),
            cpus=64,
            memory_mib=(64 if i % 3 else 1) * 1024,
            used_memory_mib=i % 50 * 100,
            labels={"zone": "abc"[i % 3], "rack": f"r{i // 20}"},
        )
        for i in range(hosts)
    )
    return Snapshot(nodes)


def _pending_vm() -> Vm:
    now = datetime.now(UTC)
    return Vm(
        name="web-1",
        id="v1",
        created_at=now,
        updated_at=now,
        spec=VmCreate.model_validate({"name": "web-1", "memory_mib": 2048}).spec(),
        status=VmStatus(state="pending"),
    )


def test_a_plan_over_1000_hosts_is_stored_in_a_few_kilobytes_and_says_what_it_left_out() -> None:
    vm = _pending_vm()
    plan = Scheduler(_cluster(1000)).schedule(Request("web-1", 1, 2048))
    assert plan.node is not None
    # Whole, the plan is ~100 KB: 30 such records in one placement transaction would pass
    # etcd's 1.5 MiB request limit.
    assert len(json.dumps(plan.as_dict())) > 80_000
    raw = placement_record(vm, plan, plan.explain(), None)
    assert len(raw) < 12_000
    stored = json.loads(raw)["plan"]
    rows = stored["nodes"]
    assert rows[0] == {**rows[0], "node": plan.node, "outcome": "chosen"}
    assert sum(r["outcome"] != "rejected" for r in rows) == PLAN_ROWS_KEPT
    by_filter = {r["filter"] for r in rows if r["outcome"] == "rejected"}
    assert by_filter == {"ready", "memory"}
    left = stored["omitted"]
    assert left["feasible"] == len(plan.feasible) - PLAN_ROWS_KEPT
    assert set(left["rejected"]) == {"ready", "memory"}
    assert sum(r["outcome"] == "rejected" for r in rows) + sum(left["rejected"].values()) == len(
        plan.rejections
    )
    line = omitted_line(stored)
    assert line is not None
    assert line.startswith(f"not listed: {left['feasible']} feasible (lower totals), ")
    assert f"{left['rejected']['memory']} rejected by memory" in line


def test_a_small_cluster_plan_is_stored_whole() -> None:
    plan = Scheduler(_cluster(12)).schedule(Request("web-1", 1, 2048))
    vm = _pending_vm()
    stored = json.loads(placement_record(vm, plan, plan.explain(), None))["plan"]
    assert len(stored["nodes"]) == 12 and "omitted" not in stored
    assert omitted_line(stored) is None
