"""Every scorer: which host it prefers, the score it gives, and that the Plan shows it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from corral.scheduler import Group, PoolView, Request, Snapshot, schedule
from tests.unit.scheduler.helpers import GIB, cluster, node, vm

# node(): 8 cpus * 4.0 = 32 vCPUs, 16384 MiB * 1.0.


@dataclass
class Case:
    id: str
    snapshot: Snapshot
    request: Request
    chosen: str
    # scorer -> host -> expected (unweighted) score
    scores: dict[str, dict[str, float]]


CASES = [
    Case(
        "spread prefers the least loaded host",
        cluster([node("busy", used_vcpus=16, used_memory_mib=8192), node("idle")]),
        Request("x", 1, 1024),
        "idle",
        {"spread": {"idle": 1 - (1 / 32 + 1024 / 16384) / 2, "busy": 1 - (17 / 32 + 0.5625) / 2}},
    ),
    Case(
        "binpack prefers the most loaded host that fits",
        cluster(
            [node("busy", used_vcpus=16, used_memory_mib=8192), node("idle")], policy="binpack"
        ),
        Request("x", 1, 1024),
        "busy",
        {"binpack": {"idle": (1 / 32 + 1024 / 16384) / 2, "busy": (17 / 32 + 0.5625) / 2}},
    ),
    Case(
        "balanced prefers even vcpu and memory use",
        cluster(
            # cpu-heavy host: a memory-heavy VM evens it out; the memory-heavy host gets worse.
            [node("cpuheavy", used_vcpus=16), node("memheavy", used_memory_mib=8192)],
            policy="balanced",
        ),
        Request("x", 1, 8192),
        "cpuheavy",
        {
            "balanced": {
                "cpuheavy": 1 - abs(17 / 32 - 0.5) / 2,
                "memheavy": 1 - abs(1 / 32 - 1.0) / 2,
            }
        },
    ),
    Case(
        "balanced counts local disk for a vm with local disks",
        cluster(
            [
                node("diskfull", pools={"local": PoolView(100 * GIB, 80 * GIB)}),
                node("diskfree", pools={"local": PoolView(100 * GIB)}),
            ],
            policy="balanced",
        ),
        Request("x", 8, 4096, disks={"local": 20 * GIB}),
        "diskfree",
        {},
    ),
    Case(
        "a request's policy overrides the cluster's",
        cluster(
            [node("busy", used_vcpus=16, used_memory_mib=8192), node("idle")], policy="binpack"
        ),
        Request("x", 1, 1024, policy="spread"),
        "idle",
        {},
    ),
    Case(
        "soft affinity pulls toward the group",
        cluster(
            [node("a"), node("b", used_vcpus=4)],
            [vm("c1", "b", group="cache")],
            [Group("cache", "soft-affinity", weight=2.0)],
        ),
        Request("x", 1, 1024, group="cache"),
        "b",
        {"soft-affinity": {"a": 0.0, "b": 1.0}},
    ),
    Case(
        "soft anti-affinity pushes away from the group",
        cluster(
            [node("a"), node("b", used_vcpus=6)],
            [vm("w1", "a", group="web"), vm("w2", "a", group="web"), vm("w3", "b", group="web")],
            [Group("web", "soft-anti-affinity", weight=2.0)],
        ),
        Request("x", 1, 1024, group="web"),
        "b",
        {"soft-anti-affinity": {"a": 1 - 2 / 3, "b": 1 - 1 / 3}},
    ),
    Case(
        "priority keeps important vms apart",
        cluster(
            [node("a"), node("b", used_vcpus=4)],
            [vm("p1", "a", priority=5), vm("p2", "a", priority=7), vm("low", "b", priority=1)],
        ),
        Request("x", 1, 1024, priority=5),
        "b",
        {"priority": {"a": 1 / 3, "b": 1.0}},
    ),
    Case(
        "priority 0 leaves the choice to the policy",
        cluster(
            [node("a"), node("b", used_vcpus=8)],
            [vm("p1", "a", priority=5), vm("p2", "a", priority=7)],
        ),
        Request("x", 1, 1024),
        "a",
        {},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_scorer_prefers_and_scores(case: Case) -> None:
    plan = schedule(case.snapshot, case.request)
    assert plan.node == case.chosen, plan.rows()
    for scorer, per_host in case.scores.items():
        for host, want in per_host.items():
            assert plan.breakdown[host][scorer] == pytest.approx(want)
    # The total is the weighted sum of the scores shown.
    for host, scores in plan.breakdown.items():
        total = sum(plan.weights[s] * v for s, v in scores.items())
        assert plan.scores[host] == pytest.approx(total)
        assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_only_the_scorers_that_count_are_shown() -> None:
    snap = cluster(
        [node("a"), node("b")],
        [vm("w1", "a", group="web", priority=3)],
        [Group("web", "soft-anti-affinity", weight=0.7)],
    )
    plan = schedule(snap, Request("x", 1, 1024, group="web", priority=3))
    assert plan.weights == {"spread": 1.0, "soft-anti-affinity": 0.7, "priority": 0.5}
    assert set(plan.breakdown["a"]) == {"spread", "soft-anti-affinity", "priority"}
    plain = schedule(snap, Request("y", 1, 1024))
    assert plain.weights == {"spread": 1.0}


def test_ties_go_to_the_first_name_whatever_the_snapshot_order() -> None:
    for order in (["n2", "n1", "n3"], ["n3", "n1", "n2"]):
        plan = schedule(cluster([node(n) for n in order]), Request("x", 1, 1024))
        assert plan.node == "n1"
