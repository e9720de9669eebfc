"""Properties over random clusters (Hypothesis), checked against a plain reference of the rules:

* no sequence of placements ever takes a host past its capacity times its ratio;
* a chosen host keeps every hard rule, and a VM that some host could take is always placed;
* every host is either scored or rejected, never both, never missing;
* rebalancing never raises the imbalance score and every move keeps every hard rule.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.scheduler import (
    NodeView,
    PlacedVm,
    PoolView,
    Request,
    Scheduler,
    Snapshot,
    schedule,
)
from corral.scheduler.rebalance import imbalance, plan_moves
from tests.unit.scheduler.helpers import GROUPS

GIB = 1024**3
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def hosts(draw: st.DrawFn, count: int) -> NodeView:
    cpus = draw(st.integers(1, 16))
    memory = draw(st.sampled_from([2048, 4096, 8192, 16384]))
    labels = {}
    if draw(st.booleans()):
        labels["zone"] = draw(st.sampled_from("abc"))
    if draw(st.booleans()):
        labels["ssd"] = draw(st.sampled_from(["yes", "no"]))
    pools = {}
    if draw(st.booleans()):
        pools["local"] = PoolView(draw(st.integers(0, 100)) * GIB)
    return NodeView(
        name=f"h{count}",
        state=draw(st.sampled_from(["ready"] * 8 + ["not-ready", "down"])),
        roles=draw(st.sampled_from([("compute",)] * 3 + [("server", "compute"), ("server",)])),
        cpus=cpus,
        memory_mib=memory,
        labels=labels,
        reserved_vcpus=draw(st.integers(0, cpus // 2)),
        reserved_memory_mib=draw(st.sampled_from([0, 256, memory // 2])),
        cpu_allocation_ratio=draw(st.sampled_from([None, 1.0, 1.5, 3.0])),
        memory_allocation_ratio=draw(st.sampled_from([None, 1.0, 1.25])),
        cordoned=draw(st.integers(0, 7)) == 7,
        maintenance=draw(st.integers(0, 7)) == 7,
        pools=pools,
        accelerators=draw(st.sampled_from([frozenset({"kvm", "tcg"})] * 3 + [frozenset({"tcg"})])),
        qemu_version=draw(st.sampled_from([None, (7, 2, 0), (8, 2, 0), (9, 0, 0)])),
        machine_types=draw(st.sampled_from([frozenset({"q35"}), frozenset({"q35", "pc"})])),
    )


@st.composite
def requests(draw: st.DrawFn, name: str) -> Request:
    disks = {}
    if draw(st.integers(0, 2)) == 2:
        disks[draw(st.sampled_from(["local", "ceph"]))] = draw(st.integers(1, 30)) * GIB
    return Request(
        vm=name,
        vcpus=draw(st.integers(1, 6)),
        memory_mib=draw(st.sampled_from([128, 512, 1024, 3072])),
        disks=disks,
        node_selector=draw(st.sampled_from([{}] * 4 + [{"ssd": "yes"}])),
        required_labels=draw(st.sampled_from([()] * 4 + [("zone",)])),
        group=draw(st.sampled_from([None, None, *GROUPS])),
        spread_over=draw(st.sampled_from([None, None, "zone"])),
        requires_kvm=draw(st.integers(0, 3)) == 3,
        priority=draw(st.integers(0, 3)),
        policy=draw(st.sampled_from([None, "spread", "binpack", "balanced"])),
    )


@st.composite
def clusters(draw: st.DrawFn) -> tuple[Snapshot, list[Request]]:
    """A cluster whose VMs were placed by the scheduler (so the state keeps every rule),
    and a few more requests to place."""
    n = draw(st.integers(1, 6))
    nodes = tuple(draw(hosts(i)) for i in range(n))
    shared = {"ceph": PoolView(draw(st.integers(0, 200)) * GIB)}
    empty = Snapshot(
        nodes,
        cpu_allocation_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
        memory_allocation_ratio=draw(st.sampled_from([1.0, 1.5])),
        groups=GROUPS,
        shared_pools=shared,
        policy=draw(st.sampled_from(["spread", "binpack", "balanced"])),
    )
    sched = Scheduler(empty)
    placed: list[PlacedVm] = []
    # Often packed tight, so that the rebalancer has something to do.
    packed = draw(st.booleans())
    for k in range(draw(st.integers(0, 16))):
        req = draw(requests(f"vm{k}"))
        if packed:
            req = replace(req, policy="binpack")
        if draw(st.integers(0, 5)) == 0 and placed:
            req = replace(req, affinity_vm=draw(st.sampled_from(placed)).name)
        plan = sched.schedule(req)
        if plan.node is not None:
            sched.place(req, plan.node)
            placed.append(PlacedVm(plan.node, req))
    snap = _snapshot_with(empty, placed)
    more = [draw(requests(f"new{k}")) for k in range(draw(st.integers(1, 6)))]
    return snap, more


def _snapshot_with(base: Snapshot, placed: list[PlacedVm]) -> Snapshot:
    """``base`` with ``placed`` on its hosts: usage summed here, independently of the index."""
    nodes = []
    for n in base.nodes:
        mine = [p.request for p in placed if p.node == n.name]
        local = sum(r.disks.get("local", 0) for r in mine)
        pools = {p: PoolView(v.capacity_bytes, v.used_bytes + local) for p, v in n.pools.items()}
        nodes.append(
            replace(
                n,
                used_vcpus=n.used_vcpus + sum(r.vcpus for r in mine),
                used_memory_mib=n.used_memory_mib + sum(r.memory_mib for r in mine),
                vms=n.vms + len(mine),
                pools=pools,
            )
        )
    shared = {
        p: PoolView(v.capacity_bytes, v.used_bytes + sum(x.request.disks.get(p, 0) for x in placed))
        for p, v in base.shared_pools.items()
    }
    return replace(base, nodes=tuple(nodes), vms=tuple(placed), shared_pools=shared)


# -- the reference: each rule written out plainly, per host


def cap(snap: Snapshot, n: NodeView) -> tuple[int, int]:
    cr = n.cpu_allocation_ratio or snap.cpu_allocation_ratio
    mr = n.memory_allocation_ratio or snap.memory_allocation_ratio
    return (
        max(0, math.floor((n.cpus - n.reserved_vcpus) * cr)),
        max(0, math.floor((n.memory_mib - n.reserved_memory_mib) * mr)),
    )


def broken_rules(snap: Snapshot, n: NodeView, r: Request) -> list[str]:
    """Every hard rule host ``n`` breaks for ``r`` except the failure-domain balance."""
    out = []
    others = [p for p in snap.vms if p.name != r.vm]
    if n.state != "ready" or n.cordoned or n.maintenance or "compute" not in n.roles:
        out.append("state")
    if any(n.labels.get(k) != v for k, v in r.node_selector.items()):
        out.append("selector")
    if any(k not in n.labels for k in r.required_labels):
        out.append("required")
    if r.requires_kvm and "kvm" not in n.accelerators:
        out.append("kvm")
    if r.source is not None:
        want = r.source_qemu_version
        if n.name == r.source:
            out.append("source")
        if want is not None and (n.qemu_version is None or n.qemu_version < want):
            out.append("qemu")
        if r.machine_type is not None and r.machine_type not in n.machine_types:
            out.append("machine type")
    cpu_cap, mem_cap = cap(snap, n)
    if n.used_vcpus + r.vcpus > cpu_cap or n.used_memory_mib + r.memory_mib > mem_cap:
        out.append("capacity")
    for pool, size in r.disks.items():
        if pool in snap.shared_pools:
            sp = snap.shared_pools[pool]
            if r.source is None and sp.used_bytes + size > sp.capacity_bytes:
                out.append("shared disk")
        elif pool not in n.pools:
            out.append("pool")
        elif n.pools[pool].used_bytes + size > n.pools[pool].capacity_bytes:
            out.append("disk")
    group = snap.groups.get(r.group or "")
    members = [p for p in others if p.request.group == r.group] if group else []
    here = sum(p.node == n.name for p in members)
    if group is not None and group.policy == "anti-affinity" and here + 1 > group.max_per_node:
        out.append("anti-affinity")
    if group is not None and group.policy == "affinity" and members and here == 0:
        out.append("affinity group")
    if r.affinity_vm is not None:
        at = [p.node for p in others if p.name == r.affinity_vm]
        if not at or at[0] != n.name:
            out.append("affinity vm")
    for p in others:
        if p.request.affinity_vm == r.vm and p.node != n.name:
            out.append("affinity back")
    if r.spread_over is not None and r.spread_over not in n.labels:
        out.append("domain label")
    return out


def domain_count(snap: Snapshot, r: Request, value: str) -> int:
    assert r.spread_over is not None
    where = {n.name: n.labels.get(r.spread_over) for n in snap.nodes}
    return sum(
        1
        for p in snap.vms
        if p.name != r.vm and p.request.group == r.group and where[p.node] == value
    )


def check_plan(snap: Snapshot, r: Request) -> None:
    plan = schedule(snap, r)
    names = {n.name for n in snap.nodes}
    assert set(plan.scores) | set(plan.rejected) == names
    assert not set(plan.scores) & set(plan.rejected)
    ok = [n for n in snap.nodes if not broken_rules(snap, n, r)]
    if plan.node is None:
        assert ok == [], (plan.explain(), [n.name for n in ok])
        return
    host = next(n for n in snap.nodes if n.name == plan.node)
    assert broken_rules(snap, host, r) == []
    assert plan.node in plan.scores and plan.score == max(plan.scores.values())
    if r.spread_over is not None and r.group is not None:
        mine = domain_count(snap, r, host.labels[r.spread_over])
        for other in ok:
            assert mine <= domain_count(snap, r, other.labels[r.spread_over])


@SETTINGS
@given(clusters())
def test_placements_never_exceed_capacity_times_ratio(case: tuple[Snapshot, list[Request]]) -> None:
    snap, more = case
    sched = Scheduler(snap)
    placed = list(snap.vms)
    for r in more:
        plan = sched.schedule(r)
        if plan.node is not None:
            sched.place(r, plan.node)
            placed.append(PlacedVm(plan.node, r))
    # Sum everything up from scratch and compare with capacity * ratio.
    for n in snap.nodes:
        mine = [p.request for p in placed if p.node == n.name]
        cpu_cap, mem_cap = cap(snap, n)
        assert sum(x.vcpus for x in mine) <= cpu_cap
        assert sum(x.memory_mib for x in mine) <= mem_cap
        if "local" in n.pools:
            assert sum(x.disks.get("local", 0) for x in mine) <= n.pools["local"].capacity_bytes
    ceph = sum(p.request.disks.get("ceph", 0) for p in placed)
    assert ceph <= snap.shared_pools["ceph"].capacity_bytes


@SETTINGS
@given(clusters(), st.data())
def test_a_plan_keeps_every_hard_rule(
    case: tuple[Snapshot, list[Request]], data: st.DataObject
) -> None:
    snap, more = case
    for r in more:
        check_plan(snap, r)
    if snap.vms:
        # A live migration of a placed VM, from its host, with that host's QEMU.
        moving = data.draw(st.sampled_from(snap.vms))
        src = next(n for n in snap.nodes if n.name == moving.node)
        check_plan(
            snap,
            replace(
                moving.request,
                source=src.name,
                source_qemu_version=src.qemu_version,
                machine_type=data.draw(st.sampled_from([None, "q35", "pc"])),
            ),
        )


@SETTINGS
@given(clusters(), st.floats(0.0, 0.2), st.integers(0, 6))
def test_rebalancing_never_raises_the_score(
    case: tuple[Snapshot, list[Request]], min_gain: float, budget: int
) -> None:
    snap, _ = case
    before = imbalance(snap)
    moves = plan_moves(snap, min_gain=min_gain, max_moves=budget)
    assert len(moves) <= budget
    assert len({m.vm for m in moves}) == len(moves)
    state = snap
    for m in moves:
        assert m.score_before - m.score_after >= max(min_gain, 1e-9)
        vm = next(p for p in state.vms if p.name == m.vm)
        src = next(n for n in state.nodes if n.name == m.source)
        migration = replace(vm.request, source=m.source, source_qemu_version=src.qemu_version)
        target = next(n for n in state.nodes if n.name == m.target)
        # The move was legal in the state it was planned against.
        assert broken_rules(state, target, migration) == [], m
        # Recompute the cluster from scratch with the VM on its new host.
        placed = [PlacedVm(m.target, p.request) if p.name == m.vm else p for p in state.vms]
        state = _snapshot_with(_bare(snap), placed)
        assert imbalance(state) == pytest.approx(m.score_after, abs=1e-9)
    assert imbalance(state) <= before + 1e-12


def _bare(snap: Snapshot) -> Snapshot:
    """``snap`` with no VMs and no usage (every usage in these tests comes from its VMs)."""
    nodes = tuple(
        replace(
            n,
            used_vcpus=0,
            used_memory_mib=0,
            vms=0,
            pools={p: PoolView(v.capacity_bytes) for p, v in n.pools.items()},
        )
        for n in snap.nodes
    )
    shared = {p: PoolView(v.capacity_bytes) for p, v in snap.shared_pools.items()}
    return replace(snap, nodes=nodes, vms=(), shared_pools=shared)
