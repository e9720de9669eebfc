"""Every filter: a host that breaks its rule is rejected by that filter with its sentence, and a
host that keeps it is chosen."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from corral.scheduler import Group, PoolView, Request, Snapshot, schedule
from corral.scheduler.feasible import (
    accel,
    affinity,
    anti_affinity,
    cpu,
    disk,
    failure_domain,
    labels,
    maintenance,
    memory,
    migration,
    pools,
    ready,
    role,
)
from tests.unit.scheduler.helpers import GIB, cluster, node, vm


@dataclass
class Case:
    id: str
    snapshot: Snapshot
    request: Request
    filter: str
    # Exact sentence for the host "bad"; "good" must be chosen.
    reason: str


def req(**kw: object) -> Request:
    base: dict[str, object] = {"vm": "new", "vcpus": 1, "memory_mib": 1024}
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


CASES = [
    Case(
        "not ready",
        cluster([node("bad", state="not-ready"), node("good")]),
        req(),
        ready.NAME,
        "node is not ready (not-ready)",
    ),
    Case(
        "maintenance",
        cluster([node("bad", maintenance=True), node("good")]),
        req(),
        maintenance.NAME,
        maintenance.REASON_MAINTENANCE,
    ),
    Case(
        "cordoned (draining)",
        cluster([node("bad", cordoned=True), node("good")]),
        req(),
        maintenance.NAME,
        maintenance.REASON_CORDONED,
    ),
    Case(
        "no compute role",
        cluster([node("bad", roles=("server",)), node("good")]),
        req(),
        role.NAME,
        role.REASON_NOT_COMPUTE,
    ),
    Case(
        "memory: reserved memory is not the guests'",
        cluster([node("bad", memory_mib=4096, reserved_memory_mib=3584), node("good")]),
        req(memory_mib=1024),
        memory.NAME,
        "insufficient memory (needs 1024 MiB, 512 free)",
    ),
    Case(
        "memory: per-node ratio beats the cluster's",
        cluster(
            [
                node("bad", memory_mib=4096, used_memory_mib=4096, memory_allocation_ratio=1.0),
                node("good", memory_mib=4096, used_memory_mib=4096),
            ],
            memory_allocation_ratio=1.5,
        ),
        req(memory_mib=1024),
        memory.NAME,
        "insufficient memory (needs 1024 MiB, 0 free)",
    ),
    Case(
        "cpu: capacity is (cpus - reserved) * ratio",
        cluster([node("bad", cpus=4, reserved_vcpus=2, used_vcpus=7), node("good")]),
        req(vcpus=2),
        cpu.NAME,
        "insufficient vcpus (needs 2, 1 free)",
    ),
    Case(
        "cpu: per-node ratio",
        cluster(
            [
                node("bad", cpus=4, used_vcpus=4, cpu_allocation_ratio=1.0),
                node("good", cpus=4, used_vcpus=4, cpu_allocation_ratio=2.0),
            ],
            cpu_allocation_ratio=1.0,
        ),
        req(vcpus=1),
        cpu.NAME,
        "insufficient vcpus (needs 1, 0 free)",
    ),
    Case(
        "disk: local pool too full",
        cluster(
            [
                node("bad", pools={"local": PoolView(100 * GIB, 95 * GIB)}),
                node("good", pools={"local": PoolView(100 * GIB)}),
            ]
        ),
        req(disks={"local": 10 * GIB}),
        disk.NAME,
        "insufficient disk in pool local (needs 10.0 GiB, 5.0 GiB free)",
    ),
    Case(
        "pools: pool missing on the host",
        cluster(
            [
                node("bad", pools={"other": PoolView(100 * GIB)}),
                node("good", pools={"local": PoolView(100 * GIB)}),
            ]
        ),
        req(disks={"local": GIB}),
        pools.NAME,
        "storage pool not on this node (local)",
    ),
    Case(
        "labels: selector value differs",
        cluster([node("bad", labels={"ssd": "no"}), node("good", labels={"ssd": "yes"})]),
        req(node_selector={"ssd": "yes"}),
        labels.NAME,
        "node selector does not match (ssd='yes' wanted, node has 'no')",
    ),
    Case(
        "labels: selector label unset",
        cluster([node("bad"), node("good", labels={"ssd": "yes"})]),
        req(node_selector={"ssd": "yes"}),
        labels.NAME,
        "node selector does not match (ssd='yes' wanted, node has unset)",
    ),
    Case(
        "labels: required label missing",
        cluster([node("bad"), node("good", labels={"gpu": "a100"})]),
        req(required_labels=("gpu",)),
        labels.NAME,
        "required label missing (gpu)",
    ),
    Case(
        "accel: kvm required",
        cluster([node("bad", accelerators=frozenset({"tcg"})), node("good")]),
        req(requires_kvm=True),
        accel.NAME,
        "node has no KVM (accelerators: tcg)",
    ),
    Case(
        "migration: the source itself",
        cluster([node("bad"), node("good")], [vm("new", "bad")]),
        req(source="bad"),
        migration.NAME,
        migration.REASON_IS_SOURCE,
    ),
    Case(
        "migration: older qemu",
        cluster([node("src"), node("bad", qemu_version=(7, 2, 0)), node("good")]),
        req(source="src", source_qemu_version=(8, 2, 0)),
        migration.NAME,
        "qemu older than the source's (7.2.0 < 8.2.0)",
    ),
    Case(
        "migration: unknown qemu",
        cluster([node("src"), node("bad", qemu_version=None), node("good")]),
        req(source="src", source_qemu_version=(8, 2, 0)),
        migration.NAME,
        "qemu version unknown (source runs 8.2.0)",
    ),
    Case(
        "migration: machine type",
        cluster([node("src"), node("bad", machine_types=frozenset({"pc"})), node("good")]),
        req(source="src", machine_type="pc-q35-8.2"),
        migration.NAME,
        "machine type not supported (pc-q35-8.2)",
    ),
    Case(
        "affinity: with a named vm",
        cluster([node("bad"), node("good")], [vm("db", "good")]),
        req(affinity_vm="db"),
        affinity.NAME,
        "affinity requires another node (vm db is on good)",
    ),
    Case(
        "affinity: with the group",
        cluster(
            [node("bad"), node("good")],
            [vm("a1", "good", group="pair")],
            [Group("pair", "affinity")],
        ),
        req(group="pair"),
        affinity.NAME,
        "affinity requires another node (group pair is on good)",
    ),
    Case(
        "affinity: a vm that must stay with it",
        cluster([node("bad"), node("good")], [vm("sidecar", "good", affinity_vm="new")]),
        req(),
        affinity.NAME,
        "affinity requires another node (vm sidecar must stay with it on good)",
    ),
    Case(
        "anti-affinity: default max_per_node 1",
        cluster(
            [node("bad"), node("good")],
            [vm("w1", "bad", group="web")],
            [Group("web", "anti-affinity")],
        ),
        req(group="web"),
        anti_affinity.NAME,
        "anti-affinity group is full on this node (group web has 1 here, max_per_node 1)",
    ),
    Case(
        "anti-affinity: max_per_node 2",
        cluster(
            [node("bad"), node("good")],
            [
                vm("w1", "bad", group="web"),
                vm("w2", "bad", group="web"),
                vm("w3", "good", group="web"),
            ],
            [Group("web", "anti-affinity", max_per_node=2)],
        ),
        req(group="web"),
        anti_affinity.NAME,
        "anti-affinity group is full on this node (group web has 2 here, max_per_node 2)",
    ),
    Case(
        "spread-over: host without the label",
        cluster([node("bad"), node("good", labels={"zone": "a"})]),
        req(spread_over="zone"),
        failure_domain.NAME,
        "node has no failure-domain label (zone)",
    ),
    Case(
        "spread-over: zone already holds more of the group",
        cluster(
            [node("bad", labels={"zone": "a"}), node("good", labels={"zone": "b"})],
            [vm("d1", "bad", group="db")],
            [Group("db", "soft-anti-affinity")],
        ),
        req(group="db", spread_over="zone"),
        failure_domain.NAME,
        "failure domain holds more of the group than another (zone=a holds 1 of group db, "
        "zone=b holds 0)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_filter_rejects_with_its_reason(case: Case) -> None:
    plan = schedule(case.snapshot, case.request)
    assert plan.node == "good", plan.explain()
    assert plan.rejected_by["bad"] == case.filter
    assert plan.rejected["bad"] == case.reason
    assert "bad" not in plan.scores


def test_every_reason_constant_starts_its_sentence() -> None:
    for case in CASES:
        plan = schedule(case.snapshot, case.request)
        module = {
            m.NAME: m
            for m in (
                accel,
                affinity,
                anti_affinity,
                cpu,
                disk,
                failure_domain,
                labels,
                maintenance,
                memory,
                migration,
                pools,
                ready,
                role,
            )
        }[case.filter]
        constants = [v for k, v in vars(module).items() if k.startswith("REASON_")]
        assert any(plan.rejected["bad"].startswith(c) for c in constants), case.id


def test_shared_pool_is_reachable_everywhere_and_full_rejects_everyone() -> None:
    snap = cluster([node("a"), node("b")], shared_pools={"ceph": PoolView(100 * GIB, 90 * GIB)})
    assert schedule(snap, req(disks={"ceph": 5 * GIB})).node == "a"
    plan = schedule(snap, req(disks={"ceph": 50 * GIB}))
    assert plan.node is None
    assert plan.rejected_by == {"a": disk.NAME, "b": disk.NAME}
    assert plan.rejected["a"] == (
        "insufficient disk in shared pool ceph (needs 50.0 GiB, 10.0 GiB free)"
    )


def test_migration_needs_no_new_room_on_a_shared_pool() -> None:
    snap = cluster(
        [node("src"), node("dst")],
        [vm("big", "src", disks={"ceph": 90 * GIB})],
        shared_pools={"ceph": PoolView(100 * GIB, 90 * GIB)},
    )
    plan = schedule(snap, Request("big", 1, 1024, disks={"ceph": 90 * GIB}, source="src"))
    assert plan.node == "dst"


def test_affinity_to_an_unplaced_vm_closes_every_host() -> None:
    plan = schedule(cluster([node("a"), node("b")]), req(affinity_vm="ghost"))
    assert plan.node is None
    assert plan.rejected == {
        "a": "affinity names a vm that is not placed (ghost)",
        "b": "affinity names a vm that is not placed (ghost)",
    }


def test_affinity_group_with_no_member_placed_leaves_every_host_open() -> None:
    snap = cluster([node("a"), node("b")], groups=[Group("pair", "affinity")])
    plan = schedule(snap, req(group="pair"))
    assert set(plan.scores) == {"a", "b"}


def test_spread_over_ignores_a_zone_that_cannot_take_the_vm() -> None:
    # Zone b holds none of the group but its only host is full: zone a is the least crowded
    # zone that can take the VM.
    snap = cluster(
        [
            node("a1", labels={"zone": "a"}),
            node("a2", labels={"zone": "a"}),
            node("b1", labels={"zone": "b"}, used_memory_mib=16384),
        ],
        [vm("d1", "a1", group="db")],
        [Group("db", "soft-anti-affinity")],
    )
    plan = schedule(snap, req(group="db", spread_over="zone"))
    assert plan.node is not None and plan.node.startswith("a")
    assert plan.rejected_by["b1"] == memory.NAME


def test_migrating_vm_does_not_count_against_itself() -> None:
    # Its own membership on the source must not fill the anti-affinity slot it is leaving,
    # nor make its own zone look crowded.
    snap = cluster(
        [node("s", labels={"zone": "a"}), node("t", labels={"zone": "a"})],
        [vm("w1", "s", group="web")],
        [Group("web", "anti-affinity")],
    )
    r = Request("w1", 1, 1024, group="web", spread_over="zone", source="s")
    assert schedule(snap, r).node == "t"


def test_migrating_vm_does_not_crowd_its_own_zone() -> None:
    # Zone a holds w1 (migrating) and w2, zone b holds w3: without w1 both zones hold one, so
    # a2 stays open; counting w1 would make zone a look crowded.
    snap = cluster(
        [
            node("a1", labels={"zone": "a"}),
            node("a2", labels={"zone": "a"}),
            node("b1", labels={"zone": "b"}),
        ],
        [vm("w1", "a1", group="web"), vm("w2", "a1", group="web"), vm("w3", "b1", group="web")],
        [Group("web", "soft-anti-affinity")],
    )
    r = Request("w1", 1, 1024, group="web", spread_over="zone", source="a1")
    plan = schedule(snap, r)
    assert set(plan.scores) == {"a2", "b1"}
    assert plan.rejected_by == {"a1": "migration"}


def test_group_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="max_per_node must be >= 1"):
        Group("g", "anti-affinity", max_per_node=0)
    with pytest.raises(ValueError, match="policy must be one of"):
        Group("g", "repel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy must be one of spread, binpack, balanced"):
        req(policy="random")
