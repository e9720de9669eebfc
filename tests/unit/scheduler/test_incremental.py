"""The scheduler's incremental bookkeeping (usage, free room, cached score columns, group and
failure-domain counts) agrees with a scheduler built from scratch after every change.

A long random sequence of placements, removals, live migrations and re-plans of placed VMs runs
against one :class:`Scheduler`; before each step the same request is planned by a Scheduler
built from a fresh snapshot of the same state, and the two plans must be the same: host,
score, every rejection (in the same order), every score column and total.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from corral.scheduler import NodeView, PlacedVm, Plan, PoolView, Request, Scheduler, Snapshot
from corral.scheduler.feasible.base import without
from corral.scheduler.index import Room, cpu_capacity, memory_capacity
from tests.unit.scheduler.helpers import GROUPS

GIB = 1024**3


def _hosts(rng: random.Random, count: int) -> tuple[NodeView, ...]:
    out = []
    for h in range(count):
        labels = {"zone": "abc"[h % 3]} if h % 5 else {}
        if rng.random() < 0.6:
            labels["ssd"] = rng.choice(["yes", "no"])
        out.append(
            NodeView(
                name=f"h{h:02d}",
                state="ready" if rng.random() < 0.9 else "not-ready",
                roles=("compute",),
                cpus=rng.choice([4, 8, 16]),
                memory_mib=rng.choice([4096, 8192, 16384]),
                labels=labels,
                reserved_vcpus=rng.choice([0, 1]),
                cordoned=rng.random() < 0.05,
                pools={"local": PoolView(rng.choice([20, 60, 200]) * GIB)} if h % 4 else {},
                accelerators=frozenset({"kvm", "tcg"} if h % 6 else {"tcg"}),
                qemu_version=rng.choice([(8, 2, 0), (9, 0, 0)]),
                machine_types=frozenset({"q35"}),
            )
        )
    return tuple(out)


def _request(rng: random.Random, name: str, placed: list[str]) -> Request:
    kw: dict[str, Any] = {}
    if rng.random() < 0.3:
        kw["disks"] = {rng.choice(["local", "ceph"]): rng.randint(1, 40) * GIB}
    if rng.random() < 0.15:
        kw["node_selector"] = {"ssd": "yes"}
    if rng.random() < 0.1:
        kw["required_labels"] = ("zone",)
    if rng.random() < 0.5:
        kw["group"] = rng.choice(list(GROUPS))
    if rng.random() < 0.3:
        kw["spread_over"] = "zone"
    if rng.random() < 0.08 and placed:
        kw["affinity_vm"] = rng.choice(placed)
    return Request(
        name,
        rng.choice([1, 1, 2, 3]),
        rng.choice([256, 512, 1024, 2048]),
        requires_kvm=rng.random() < 0.2,
        priority=rng.choice([0, 0, 1, 2, 3]),
        policy=rng.choice([None, None, "spread", "binpack", "balanced"]),
        **kw,
    )


def _fresh(base: Snapshot, placed: dict[str, PlacedVm]) -> Snapshot:
    """``base`` (no usage) with ``placed`` on its hosts, every figure summed from scratch."""
    nodes = []
    for n in base.nodes:
        mine = [p.request for p in placed.values() if p.node == n.name]
        local = sum(r.disks.get("local", 0) for r in mine)
        nodes.append(
            replace(
                n,
                used_vcpus=sum(r.vcpus for r in mine),
                used_memory_mib=sum(r.memory_mib for r in mine),
                vms=len(mine),
                pools={p: PoolView(v.capacity_bytes, local) for p, v in n.pools.items()},
            )
        )
    used = sum(p.request.disks.get("ceph", 0) for p in placed.values())
    shared = {"ceph": PoolView(base.shared_pools["ceph"].capacity_bytes, used)}
    return replace(base, nodes=tuple(nodes), vms=tuple(placed.values()), shared_pools=shared)


def _check_room(snap: Snapshot, request: Request, plan: Plan) -> None:
    """Every feasible host has room for the VM; every host the cpu or memory filter rejected
    has not (the capacity filters look only at hosts short of room: this checks they miss
    none and invent none)."""
    for n in snap.nodes:
        cpu_free = cpu_capacity(snap, n) - n.used_vcpus
        mem_free = memory_capacity(snap, n) - n.used_memory_mib
        if n.name in plan.feasible:
            assert request.vcpus <= cpu_free and request.memory_mib <= mem_free, n.name
        elif plan.rejected_by[n.name] == "cpu":
            assert request.vcpus > cpu_free, n.name
        elif plan.rejected_by[n.name] == "memory":
            assert request.memory_mib > mem_free, n.name


def _facts(plan: Plan) -> tuple[object, ...]:
    return (
        plan.node,
        plan.score,
        plan.policy,
        list(plan.rejections.items()),
        plan.feasible,
        list(plan.columns.items()),
        list(plan.totals),
        list(plan.weights.items()),
    )


@pytest.mark.parametrize(
    ("seed", "bisect_up_to"), [(s, 32) for s in range(12)] + [(12, 0), (13, 0)]
)
def test_incremental_scheduler_plans_like_a_fresh_one(
    seed: int, bisect_up_to: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bisect_up_to 0: the capacity filters scan the candidates rather than bisect.
    monkeypatch.setattr(Room, "BISECT_UP_TO", bisect_up_to)
    rng = random.Random(seed)
    base = Snapshot(
        _hosts(rng, rng.randint(6, 14)),
        cpu_allocation_ratio=rng.choice([1.0, 2.0]),
        groups=GROUPS,
        shared_pools={"ceph": PoolView(rng.choice([50, 400]) * GIB)},
        policy=rng.choice(["spread", "binpack", "balanced"]),
    )
    sched = Scheduler(base)
    placed: dict[str, PlacedVm] = {}
    steps = {"place": 0, "remove": 0, "move": 0, "replan": 0, "full": 0}
    for k in range(220):
        roll = rng.random()
        names = sorted(placed)
        if roll < 0.55 or not names:
            kind = "place"
            request = _request(rng, f"vm{k}", names)
        elif roll < 0.7:
            kind = "remove"
            request = placed[rng.choice(names)].request
        elif roll < 0.9:
            kind = "move"
            vm = placed[rng.choice(names)]
            source = next(n for n in base.nodes if n.name == vm.node)
            request = replace(vm.request, source=vm.node, source_qemu_version=source.qemu_version)
        else:
            kind = "replan"  # a placed VM planned again as is (it must not count for itself)
            request = placed[rng.choice(names)].request
        if kind != "remove":
            plan = sched.schedule(request)
            snap = _fresh(base, placed)
            fresh = Scheduler(snap).schedule(request)
            assert _facts(plan) == _facts(fresh), (seed, k, kind, request)
            _check_room(snap, request, plan)
            if plan.node is None:
                steps["full"] += 1
        steps[kind] += 1
        if kind == "place" and plan.node is not None:
            sched.place(request, plan.node)
            placed[request.vm] = PlacedVm(plan.node, request)
        elif kind == "remove":
            sched.index.remove(request.vm)  # as the API's dry run does
            del placed[request.vm]
        elif kind == "move" and plan.node is not None:
            sched.move(request.vm, plan.node)
            placed[request.vm] = PlacedVm(plan.node, placed[request.vm].request)
    # The sequence really exercised every kind of change, and full hosts.
    assert min(steps.values()) > 0, steps


def test_without_cuts_out_few_or_many_hosts() -> None:
    hosts = list(range(0, 200, 3))
    for drop in ([], [0], [99], [0, 198], hosts[5:40], hosts[::2], hosts):
        assert without(hosts, drop) == [h for h in hosts if h not in drop], drop
