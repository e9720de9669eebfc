"""The imbalance score and the migration planner."""

from __future__ import annotations

import itertools

import pytest

from corral.scheduler import Group, PoolView
from corral.scheduler.rebalance import Move, imbalance, plan_moves
from tests.unit.scheduler.helpers import GIB, cluster, node, vm


def test_an_even_cluster_scores_zero() -> None:
    snap = cluster([node("a"), node("b")], [vm("v1", "a"), vm("v2", "b")])
    assert imbalance(snap) == 0.0
    assert plan_moves(snap) == []


def test_score_is_the_weighted_stddev_of_utilisation() -> None:
    # a: 8/32 vCPU, 8192/16384 MiB; b: idle. pstdev of (x, 0) is x / 2.
    snap = cluster([node("a"), node("b")], [vm("v1", "a", vcpus=8, memory_mib=8192)])
    assert imbalance(snap) == pytest.approx(0.25 / 2 + 0.5 / 2)


def test_hosts_that_take_no_vms_do_not_count() -> None:
    snap = cluster(
        [node("a"), node("b"), node("c", cordoned=True), node("d", state="down")],
        [vm("v1", "a"), vm("v2", "b"), vm("v3", "c", vcpus=8)],
    )
    assert imbalance(snap) == 0.0


def test_moves_a_vm_from_the_loaded_host_to_the_idle_one() -> None:
    snap = cluster(
        [node("a"), node("b")],
        [vm("v1", "a", 4, 4096), vm("v2", "a", 4, 4096)],
    )
    before = imbalance(snap)
    moves = plan_moves(snap, min_gain=0.01, max_moves=4)
    assert moves == [Move("v1", "a", "b", before, 0.0)]
    assert moves[0].gain == pytest.approx(before)
    assert moves[0].describe() == (f"migrate vm v1 from a to b (imbalance {before:.4f} -> 0.0000)")


def test_budget_min_gain_and_hold_down() -> None:
    vms = [vm(f"v{i}", "a", 2, 2048) for i in range(6)]
    snap = cluster([node("a"), node("b"), node("c")], vms)
    assert len(plan_moves(snap, max_moves=1)) == 1
    assert len(plan_moves(snap, max_moves=0)) == 0
    all_moves = plan_moves(snap, max_moves=10, min_gain=0.001)
    assert len(all_moves) == 4  # two to b, two to c: every host holds two
    assert [m.score_after for m in all_moves][-1] == pytest.approx(0.0)
    # Each move's before is the previous move's after: a chain that only goes down.
    for prev, nxt in itertools.pairwise(all_moves):
        assert nxt.score_before == prev.score_after
        assert nxt.score_after < nxt.score_before
    # A gain threshold above any single move's gain: nothing moves.
    assert plan_moves(snap, min_gain=1.0) == []
    held = {f"v{i}" for i in range(5)}
    only = plan_moves(snap, max_moves=10, held_down_vms=held)
    assert [m.vm for m in only] == ["v5"]


def test_each_vm_moves_at_most_once_per_plan() -> None:
    snap = cluster([node("a"), node("b"), node("c")], [vm("big", "a", 8, 8192)])
    moves = plan_moves(snap, max_moves=5, min_gain=0.0)
    # Moving the only VM around cannot help: no move at all.
    assert moves == []


@pytest.mark.parametrize(
    ("blocker", "kw", "groups"),
    [
        ("anti-affinity", {"group": "db"}, [Group("db", "anti-affinity")]),
        ("pool", {"disks": {"local": GIB}}, []),
        ("qemu", {}, []),
        ("kvm", {"requires_kvm": True}, []),
        ("selector", {"node_selector": {"ssd": "yes"}}, []),
    ],
)
def test_moves_respect_hard_rules(blocker: str, kw: dict[str, object], groups: list[Group]) -> None:
    # Host b is the idle one every move wants, but each case makes it illegal for the VMs.
    b_kw: dict[str, object] = {
        "anti-affinity": {},
        "pool": {"pools": {"other": PoolView(100 * GIB)}},
        "qemu": {"qemu_version": (7, 0, 0)},
        "kvm": {"accelerators": frozenset({"tcg"})},
        "selector": {},
    }[blocker]
    a = node("a", labels={"ssd": "yes"}, pools={"local": PoolView(100 * GIB)})
    b = node("b", **b_kw)
    vms = [vm("x1", "a", 4, 4096, **kw), vm("x2", "a", 4, 4096, **kw)]
    if blocker == "anti-affinity":
        vms = [
            vm("x1", "a", 4, 4096),
            vm("x2", "a", 4, 4096, group="db"),
            vm("d0", "b", 1, 512, group="db"),
        ]
        # x1 may move, x2 may not: the plan moves x1 only.
        moves = plan_moves(cluster([a, b], vms, groups), max_moves=4, min_gain=0.0)
        assert [m.vm for m in moves] == ["x1"]
        return
    moves = plan_moves(cluster([a, b], vms, groups), max_moves=4, min_gain=0.0)
    assert moves == []


def test_hard_affinity_pins_the_pair() -> None:
    snap = cluster(
        [node("a"), node("b")],
        [vm("app", "a", 4, 4096), vm("side", "a", 4, 4096, affinity_vm="app")],
    )
    assert plan_moves(snap, max_moves=4, min_gain=0.0) == []


def test_bad_arguments_name_the_parameter() -> None:
    snap = cluster([node("a")])
    with pytest.raises(ValueError, match="min_gain: must be >= 0"):
        plan_moves(snap, min_gain=-1)
    with pytest.raises(ValueError, match="max_moves: must be >= 0"):
        plan_moves(snap, max_moves=-1)


def test_disk_counts_over_hosts_with_local_pools() -> None:
    snap = cluster(
        [
            node("a", pools={"local": PoolView(100 * GIB)}),
            node("b", pools={"local": PoolView(100 * GIB)}),
            node("c"),
        ],
        [
            vm("v1", "a", 1, 1024, disks={"local": 50 * GIB}),
            vm("v2", "b", 1, 1024),
            vm("v3", "c", 1, 1024),
        ],
    )
    # cpu and memory are even; disk is (0.5, 0) over the two hosts that have a pool.
    assert imbalance(snap) == pytest.approx(0.25)
