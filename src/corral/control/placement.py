"""Placement on the leader: the scheduler's snapshot, the plan applier and the placement pass.

* :func:`build_snapshot` turns stored records (nodes, VMs, groups, allocation records, the
  cluster config) into the pure scheduler's :class:`Snapshot`. A VM whose volume lives on one
  host's own disk is pinned there with the node selector ``corral.dev/host=<host>`` (every host
  carries that label, as Kubernetes' ``kubernetes.io/hostname``), so ``vm why`` names the rule.
* The **allocation record** of a host (``/corral/v1/alloc/<node>``) lists what each VM placed
  there takes. It is the plan applier's source of truth: :func:`commit_placements` re-checks
  every plan against the latest record and node (capacity after reservations and overcommit,
  still ready, not cordoned) and commits the VMs, their assignments, their explanations and
  the new records in one etcd transaction that compares each record's and node's
  ``mod_revision``. Two placements that raced on stale state cannot both commit: the loser gets
  a Conflict and is planned again on fresh state. :class:`AllocationLoop` repairs records that
  lag (a VM deleted by its host's report, a resize), with the same compare.
* :class:`PlacementLoop` places every pending VM in one pass over one :class:`Scheduler`
  (priority first, then oldest), and keeps each plan (``/corral/v1/placements/<vm>``) for
  ``corral vm why``. A VM that fits nowhere stays ``pending`` with the reasons, and is tried
  again whenever a node, a VM or an allocation changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from corral.control.context import LeaderContext
from corral.control.queue import Outcome
from corral.control.vms import desired_assignment, volume_host
from corral.errors import Conflict
from corral.model import ClusterConfig, ClusterInfo, Group, Migration, Node, Vm
from corral.model.common import rfc3339, utcnow
from corral.scheduler import Group as SchedGroup
from corral.scheduler import Move, NodeView, PlacedVm, Plan, Request, Scheduler, Snapshot
from corral.scheduler.index import ClusterIndex, cpu_capacity, memory_capacity
from corral.state import KV, Delete, Expect, Objects, Put, keys
from corral.state.codec import CodecError, decode, encode

__all__ = [
    "HOST_LABEL",
    "Allocation",
    "AllocationLoop",
    "DrainStep",
    "Placement",
    "PlacementLoop",
    "build_snapshot",
    "commit_placements",
    "fits",
    "incoming_allocations",
    "move_dict",
    "placement_record",
    "plan_drain",
    "vm_request",
]

log = logging.getLogger(__name__)

HOST_LABEL = "corral.dev/host"
"""A label every host carries (its name): pins a VM to the host of its local volume."""

UNPLACED_RETRY_S = 10.0
# VMs per transaction: 3 keys each plus one allocation record per host stays under etcd's
# default limit of 128 operations per transaction.
BATCH = 30

Pin = Callable[[Vm], "tuple[str, str] | None"]


# -- allocation records ------------------------------------------------------------------


# Allocation record key -> (its bytes, their decoding), last seen.
_DECODED: dict[str, tuple[bytes, dict[str, tuple[int, int]]]] = {}


@dataclass
class Allocation:
    """What the VMs placed on one host take: VM name -> (vCPUs, MiB)."""

    vms: dict[str, tuple[int, int]] = field(default_factory=dict)
    # mod_revision of the stored record; 0 when there is none yet.
    revision: int = 0

    @property
    def vcpus(self) -> int:
        return sum(c for c, _ in self.vms.values())

    @property
    def memory_mib(self) -> int:
        return sum(m for _, m in self.vms.values())

    def encode(self) -> bytes:
        data = {"vms": {n: list(v) for n, v in sorted(self.vms.items())}}
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, kv: KV) -> Allocation:
        """The record in ``kv`` (a copy of its last decoding when the record is unchanged:
        a host's record lists every VM on it and is read on each placement there)."""
        hit = _DECODED.get(kv.key)
        if hit is not None and hit[0] == kv.value:
            return cls(dict(hit[1]), kv.mod_revision)
        try:
            data = json.loads(kv.value)
            vms = {str(n): (int(v[0]), int(v[1])) for n, v in data["vms"].items()}
        except (ValueError, KeyError, TypeError, IndexError):
            log.error("unreadable allocation record %s; rebuilding it", kv.key)
            vms = {}
        _DECODED[kv.key] = (kv.value, vms)
        return cls(dict(vms), kv.mod_revision)

    def expect(self, node: str) -> Expect:
        key = keys.alloc_key(node)
        return Expect(key, mod_revision=self.revision) if self.revision else Expect.missing(key)

    def copy(self) -> Allocation:
        return Allocation(dict(self.vms), self.revision)


def derived_allocations(vms: Iterable[Vm]) -> dict[str, Allocation]:
    """Allocation per host computed from the VM records (for hosts with no record yet)."""
    out: dict[str, Allocation] = {}
    for vm in vms:
        if vm.status.node:
            out.setdefault(vm.status.node, Allocation()).vms[vm.name] = (
                vm.spec.vcpus,
                vm.spec.memory_mib,
            )
    return out


def allocations(records: Iterable[KV], vms: Iterable[Vm]) -> dict[str, Allocation]:
    """Stored records, with hosts that have none filled from the VM records (revision 0)."""
    out = derived_allocations(vms)
    for kv in records:
        out[keys.name_from_key(kv.key)] = Allocation.decode(kv)
    return out


def incoming_allocations(
    migrations: Iterable[Migration], vms: Mapping[str, Vm]
) -> dict[str, Allocation]:
    """Per target host, the VMs a live migration is bringing there and that its allocation
    record does not hold yet (migrations under way, before their switch-over)."""
    out: dict[str, Allocation] = {}
    for m in migrations:
        if m.final or m.status.phase == "switched-over":
            continue
        vm = vms.get(m.name)
        if vm is None or vm.id != m.spec.vm_id or vm.status.node == m.spec.target:
            continue
        out.setdefault(m.spec.target, Allocation()).vms[vm.name] = (
            vm.spec.vcpus,
            vm.spec.memory_mib,
        )
    return out


# -- snapshot ----------------------------------------------------------------------------


def node_view(node: Node, alloc: Allocation | None) -> NodeView | None:
    """The scheduler's view of a host, or None while it has reported no inventory."""
    inv = node.status.inventory
    if inv is None:
        return None
    a = alloc or Allocation()
    spec = node.spec
    return NodeView(
        name=node.name,
        state=node.status.state,
        roles=tuple(spec.roles),
        cpus=inv.cpus,
        memory_mib=inv.memory_mib,
        used_vcpus=a.vcpus,
        used_memory_mib=a.memory_mib,
        vms=len(a.vms),
        labels={**spec.labels, HOST_LABEL: node.name},
        reserved_vcpus=spec.reserved_vcpus,
        reserved_memory_mib=spec.reserved_memory_mib,
        cpu_allocation_ratio=spec.cpu_allocation_ratio,
        memory_allocation_ratio=spec.memory_allocation_ratio,
        cordoned=spec.cordoned,
        maintenance=spec.maintenance,
    )


def vm_request(
    vm: Vm, pinned: tuple[str, str] | None = None, groups: Mapping[str, object] | None = None
) -> Request:
    """What ``vm`` asks of a host. ``pinned`` is (host, volume) for a VM with a local volume;
    a group that does not exist (any more) is ignored."""
    s = vm.spec
    selector = dict(s.node_selector)
    if pinned is not None:
        selector[HOST_LABEL] = pinned[0]
    group = s.group if s.group is not None and (groups is None or s.group in groups) else None
    return Request(
        vm=vm.name,
        vcpus=s.vcpus,
        memory_mib=s.memory_mib,
        node_selector=selector,
        required_labels=tuple(s.required_labels),
        group=group,
        affinity_vm=s.affinity_vm,
        spread_over=s.spread_over,
        priority=s.priority,
        policy=s.placement_policy,
        labels=dict(s.labels),
    )


def build_snapshot(
    *,
    nodes: Iterable[Node],
    vms: Iterable[Vm],
    groups: Iterable[Group],
    allocs: Mapping[str, Allocation],
    config: ClusterConfig,
    cpu_allocation_ratio: float,
    memory_allocation_ratio: float,
    pin: Pin | None = None,
    migrations: Iterable[Migration] = (),
    requests: dict[str, tuple[int, PlacedVm]] | None = None,
) -> Snapshot:
    """The cluster as the scheduler sees it. Usage comes from the allocation records plus the
    live migrations heading to a host (the guest takes room there before its switch-over moves
    the allocation); the VM list (for group rules and the rebalancer) from the VM records
    placed on known hosts."""
    vms = list(vms)
    incoming = incoming_allocations(migrations, {v.name: v for v in vms})
    views = []
    for node in nodes:
        if node.status.state == "left":
            continue
        alloc = allocs.get(node.name)
        extra = incoming.get(node.name)
        if extra is not None:
            alloc = (alloc or Allocation()).copy()
            alloc.vms.update(extra.vms)
        view = node_view(node, alloc)
        if view is not None:
            views.append(view)
    known = {v.name for v in views}
    sched_groups = {
        g.name: SchedGroup(g.name, g.spec.policy, g.spec.max_per_node, g.spec.weight)
        for g in groups
    }
    placed = []
    for vm in vms:
        if vm.status.node in known:
            # A VM without disks or group asks the same for as long as its record is
            # unchanged: ``requests`` (name -> (mod_revision, PlacedVm)) keeps it across passes.
            plain = requests is not None and not vm.spec.disks and vm.spec.group is None
            hit = requests.get(vm.name) if plain and requests is not None else None
            if hit is not None and hit[0] == vm.mod_revision and vm.mod_revision:
                placed.append(hit[1])
                continue
            pinned = pin(vm) if pin is not None and vm.spec.disks else None
            one = PlacedVm(vm.status.node, vm_request(vm, pinned, sched_groups))
            if plain and requests is not None:
                requests[vm.name] = (vm.mod_revision, one)
            placed.append(one)
    return Snapshot(
        tuple(views),
        cpu_allocation_ratio,
        memory_allocation_ratio,
        vms=tuple(placed),
        groups=sched_groups,
        policy=config.placement_policy,
    )


# Hosts a stored plan keeps: the best feasible ones, and per filter the first hosts it
# rejected. Whole, a plan over 1,000 hosts is ~130 KB: 30 of them in one placement
# transaction would pass etcd's 1.5 MiB request limit, and placing stopped.
PLAN_ROWS_KEPT = 16


def placement_record(vm: Vm, plan: Plan, message: str, pinned: tuple[str, str] | None) -> bytes:
    """What ``corral vm why`` shows: the plan with each host's rejection or scores (up to
    ``PLAN_ROWS_KEPT`` feasible hosts and as many per rejecting filter; ``omitted`` counts
    the others)."""
    data: dict[str, Any] = {
        "vm": vm.name,
        "vm_id": vm.id,
        "decided_at": rfc3339(utcnow()),
        "node": plan.node,
        "message": message,
        "pinned": {"node": pinned[0], "volume": pinned[1]} if pinned else None,
        "plan": plan.as_dict(PLAN_ROWS_KEPT),
    }
    return json.dumps(data, separators=(",", ":")).encode()


# -- the plan applier --------------------------------------------------------------------


@dataclass
class Placement:
    """One plan to commit: ``vm`` (a private copy, its status already set) goes to ``node``."""

    vm: Vm
    node: str
    extra_ops: list[Put | Delete] = field(default_factory=list)


def fits(node: Node, alloc: Allocation, settings_ratios: tuple[float, float]) -> str | None:
    """None when ``alloc`` fits on ``node`` now, else why not (the applier's re-check)."""
    return _Room.of(node, settings_ratios).why_not(alloc.vcpus, alloc.memory_mib)


@dataclass(frozen=True)
class _Room:
    """What a host takes (its capacity after ratios and reservations), or why it takes
    nothing; computed once per host and commit."""

    node: str
    closed: str | None
    cpu: int
    memory_mib: int

    @classmethod
    def of(cls, node: Node, settings_ratios: tuple[float, float]) -> _Room:
        view = node_view(node, Allocation())
        if view is None:
            return cls(node.name, f"node {node.name} has no inventory", 0, 0)
        closed = None
        if node.status.state != "ready":
            closed = f"node {node.name} is {node.status.state}"
        elif node.spec.maintenance or node.spec.cordoned:
            why = "in maintenance" if node.spec.maintenance else "cordoned"
            closed = f"node {node.name} is {why}"
        snap = Snapshot((view,), settings_ratios[0], settings_ratios[1])
        return cls(node.name, closed, cpu_capacity(snap, view), memory_capacity(snap, view))

    def why_not(self, vcpus: int, memory_mib: int) -> str | None:
        if self.closed is not None:
            return self.closed
        if vcpus > self.cpu:
            return f"node {self.node}: vCPUs would be {vcpus} of {self.cpu}"
        if memory_mib > self.memory_mib:
            return f"node {self.node}: memory would be {memory_mib} of {self.memory_mib} MiB"
        return None


@dataclass
class ApplyResult:
    committed: list[str]
    # vm -> why the applier refused its plan (it is planned again on fresh state).
    refused: dict[str, str]


class PlanApplier:
    """Re-checks plans against the latest allocation records and commits them atomically."""

    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    def allocation(self, node: str) -> Allocation:
        """The host's allocation record as cached: a private copy, free to change."""
        kv = self.ctx.informer.get(keys.alloc_key(node))
        if kv is not None:
            return Allocation.decode(kv)
        return derived_allocations(v for v in self.ctx.all(Vm) if v.status.node == node).get(
            node, Allocation()
        )

    def ratios(self) -> tuple[float, float]:
        s = self.ctx.settings
        return s.cpu_allocation_ratio, s.memory_allocation_ratio

    async def apply(
        self,
        placements: Sequence[Placement],
        *,
        release: Mapping[str, str] | None = None,
        assignment: Callable[[Vm], bytes] | None = None,
        refreshed: bool = False,
    ) -> ApplyResult:
        """Commit ``placements`` (moving a VM off ``release[vm]`` when given) in one
        transaction. Plans that no longer fit are left out and returned as refused.

        When the commit finds a record changed, the node and allocation records are read
        afresh (a host's heartbeat rewrites its node record every few seconds, and the watch
        can lag behind a busy leader) and the plans are checked and committed once more.
        Raises Conflict when that fails too, or when a VM itself changed meanwhile."""
        # Per host touched: its record as it will be written (a private copy, made once),
        # what it takes, and its running vCPU and MiB sums.
        allocs: dict[str, Allocation] = {}
        rooms: dict[str, _Room] = {}
        sums: dict[str, list[int]] = {}
        nodes: dict[str, Node] = {}
        changed: set[str] = set()
        refused: dict[str, str] = {}
        accepted: list[Placement] = []
        release = release or {}

        def working(name: str) -> Allocation:
            alloc = allocs.get(name)
            if alloc is None:
                alloc = allocs[name] = self.allocation(name)  # a fresh copy
                sums[name] = [alloc.vcpus, alloc.memory_mib]
            return alloc

        for p in placements:
            node = nodes.get(p.node) or self.ctx.peek(Node, p.node)
            if node is None:
                refused[p.vm.name] = f"node {p.node} is gone"
                continue
            nodes[p.node] = node
            room = rooms.get(p.node) or rooms.setdefault(p.node, _Room.of(node, self.ratios()))
            alloc = working(p.node)
            total = sums[p.node]
            old = alloc.vms.get(p.vm.name, (0, 0))
            want = (p.vm.spec.vcpus, p.vm.spec.memory_mib)
            vcpus, memory = total[0] - old[0] + want[0], total[1] - old[1] + want[1]
            why = room.why_not(vcpus, memory)
            if why is not None:
                refused[p.vm.name] = why
                continue
            alloc.vms[p.vm.name] = want
            total[:] = [vcpus, memory]
            changed.add(p.node)
            source = release.get(p.vm.name)
            if source is not None and source != p.node:
                changed.add(source)
                src = working(source)
                gone = src.vms.pop(p.vm.name, None)
                if gone is not None:
                    sums[source][0] -= gone[0]
                    sums[source][1] -= gone[1]
                src_node = nodes.get(source) or self.ctx.peek(Node, source)
                if src_node is not None:
                    nodes[source] = src_node
            accepted.append(p)
        if not accepted:
            return ApplyResult([], refused)
        ops: list[Put | Delete] = []
        expect: list[Expect] = []
        for p in accepted:
            vm = p.vm
            expect.append(Expect(Objects.key(Vm, vm.name), mod_revision=vm.mod_revision))
            ops.append(Objects.put(vm))
            source = release.get(vm.name)
            if source is not None and source != p.node:
                ops.append(Delete(keys.assign_key(source, vm.name)))
            value = (
                assignment(vm)
                if assignment is not None
                else encode("assignment", desired_assignment(vm, self.ctx))
            )
            ops.append(Put(keys.assign_key(p.node, vm.name), value))
            ops.extend(p.extra_ops)
        for node in nodes.values():
            expect.append(Objects.expect_unchanged(node))
        # Allocation records last: whoever sees a record has seen the VMs written with it.
        for name, alloc in allocs.items():
            if name not in changed:
                continue
            expect.append(alloc.expect(name))  # the revision it was read at
            ops.append(Put(keys.alloc_key(name), alloc.encode()))
        try:
            await self.ctx.commit(ops, expect)
        except Conflict:
            if refreshed:
                raise
            fresh, _ = await self.ctx.store.get_many(
                [Objects.key(Node, n) for n in nodes] + [keys.alloc_key(n) for n in allocs]
            )
            for kv in fresh.values():
                self.ctx.informer.apply(kv)  # newer wins: never rolls the cache back
            return await self.apply(
                placements, release=release, assignment=assignment, refreshed=True
            )
        return ApplyResult([p.vm.name for p in accepted], refused)


async def commit_placements(ctx: LeaderContext, placements: Sequence[Placement]) -> ApplyResult:
    """Commit new placements (see :class:`PlanApplier`)."""
    return await PlanApplier(ctx).apply(placements)


# -- the leader loops --------------------------------------------------------------------


def cluster_config(ctx: LeaderContext) -> ClusterConfig:
    kv = ctx.informer.get(keys.CLUSTER)
    if kv is None:
        return ClusterConfig()
    try:
        return decode("cluster", kv.value, ClusterInfo).config
    except CodecError:
        return ClusterConfig()


def leader_snapshot(ctx: LeaderContext) -> Snapshot:
    """The snapshot from the leader's cache."""
    vms = ctx.all(Vm)
    requests = ctx.placed_requests
    if len(requests) > 2 * len(vms) + 1000:
        requests.clear()  # VMs that are gone
    return build_snapshot(
        nodes=ctx.all(Node),
        vms=vms,
        groups=ctx.all(Group),
        allocs=allocations(ctx.informer.under(keys.ALLOC_PREFIX), vms),
        config=cluster_config(ctx),
        cpu_allocation_ratio=ctx.settings.cpu_allocation_ratio,
        memory_allocation_ratio=ctx.settings.memory_allocation_ratio,
        pin=lambda vm: volume_host(ctx, vm),
        migrations=ctx.all(Migration),
        requests=requests,
    )


class PlacementLoop:
    """Places every pending VM in one pass (the work queue's single key ``pass``)."""

    KEY = "pass"

    def __init__(self, ctx: LeaderContext, wake: Callable[[], None]) -> None:
        self.ctx = ctx
        self.pending: set[str] = set()
        # VMs wanted since the last pass. A pass plans only these unless capacity may have
        # appeared (a poke, a refused plan, the retry timer): placing more VMs never makes
        # room for one that did not fit, and re-planning every waiting VM for each new one
        # would cost O(waiting) per create.
        self._fresh: set[str] = set()
        self._everyone = True
        self._retry_at: float | None = None
        self._wake = wake
        self.applier = PlanApplier(ctx)

    def want(self, vm: str) -> Outcome:
        """Called by the VM loop for a VM with no node: it is placed by the next pass."""
        if vm not in self.pending:
            self.pending.add(vm)
            self._fresh.add(vm)
            self._wake()
        return Outcome()

    def poke(self) -> None:
        """Capacity may have appeared: run a pass over every waiting VM."""
        if self.pending:
            self._everyone = True
            self._wake()

    async def reconcile(self, key: str) -> Outcome:
        if key.startswith("forget/"):
            return await self._forget(key.removeprefix("forget/"))
        now = time.monotonic()
        everyone = self._everyone or (self._retry_at is not None and now >= self._retry_at)
        names = self.pending if everyone else self._fresh & self.pending
        self._everyone = False
        self._fresh = set()
        if everyone:
            self._retry_at = None
        try:
            return await self._pass(sorted(names))
        except BaseException:
            # The queue retries the pass: it plans these VMs again (not every waiting VM: a
            # conflict under a stream of creates would otherwise make each pass plan them all).
            self._fresh.update(names)
            if everyone:
                self._everyone = True
            raise

    async def _pass(self, names: list[str]) -> Outcome:
        todo: list[Vm] = []
        for name in names:
            shared = self.ctx.peek(Vm, name)
            if shared is None or shared.deleting or shared.status.node is not None:
                self.pending.discard(name)
                continue
            # A private copy: the pass sets its status (scalars only) to commit it.
            todo.append(shared.model_copy(update={"status": shared.status.model_copy()}))
        if not todo:
            return Outcome()
        todo.sort(key=lambda v: (-v.spec.priority, v.created_at, v.name))
        snapshot = leader_snapshot(self.ctx)
        sched = Scheduler(snapshot)
        batch: list[Placement] = []
        unplaced: list[tuple[Vm, bytes, str]] = []
        placed_msgs: list[str] = []
        for vm in todo:
            pinned = volume_host(self.ctx, vm)
            request = vm_request(vm, pinned, snapshot.groups)
            plan = sched.schedule(request)
            message = plan.explain()
            if pinned is not None:
                message = f"volume {pinned[1]} lives on host {pinned[0]}: {message}"
            record = placement_record(vm, plan, message, pinned)
            if plan.node is None:
                unplaced.append((vm, record, message))
                continue
            sched.place(request, plan.node)
            vm.status.node = plan.node
            vm.status.epoch += 1
            vm.status.state = "pending" if vm.spec.power_state == "stopped" else "starting"
            vm.status.message = message
            vm.updated_at = utcnow()
            batch.append(Placement(vm, plan.node, [Put(keys.placement_key(vm.name), record)]))
            placed_msgs.append(message)
        done = 0
        refused: dict[str, str] = {}
        by_node: dict[str, list[Placement]] = {}
        for p in batch:
            by_node.setdefault(p.node, []).append(p)

        async def commit_to(placements: list[Placement]) -> None:
            nonlocal done
            for start in range(0, len(placements), BATCH):
                result = await self.applier.apply(placements[start : start + BATCH])
                for name in result.committed:
                    self.pending.discard(name)
                done += len(result.committed)
                refused.update(result.refused)

        # Hosts' chunks commit side by side (each writes its own host's allocation record;
        # one host's chunks go one after the other). A Conflict (something changed under
        # the plans) propagates once all are done: the queue runs the pass again on fresh
        # state, for the VMs still without a host.
        outcomes = await asyncio.gather(
            *(commit_to(ps) for ps in by_node.values()), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        # Side by side: their writes share etcd transactions (a pass may find hundreds).
        kept = await asyncio.gather(
            *(self._keep_pending(vm, record, message) for vm, record, message in unplaced),
            return_exceptions=True,
        )
        for outcome in kept:
            if isinstance(outcome, BaseException):
                raise outcome
        if refused:
            log.info("plan applier refused %d plans (%s); re-planning", len(refused), refused)
            self._fresh.update(refused)
            self._wake()
        if unplaced and self._retry_at is None:
            self._retry_at = time.monotonic() + UNPLACED_RETRY_S - 0.1
        parts = []
        if done:
            parts.append(placed_msgs[0] if done == 1 else f"placed {done} vms in one pass")
        if unplaced:
            parts.append(
                unplaced[0][2] if len(unplaced) == 1 else f"{len(unplaced)} vms cannot be placed"
            )
        return Outcome("; ".join(parts), requeue_after=UNPLACED_RETRY_S if unplaced else None)

    async def _forget(self, vm: str) -> Outcome:
        """Drop the ``vm why`` record of a VM that is gone."""
        if self.ctx.informer.get(Objects.key(Vm, vm)) is not None:
            return Outcome()
        if self.ctx.informer.get(keys.placement_key(vm)) is None:
            return Outcome()
        await self.ctx.commit([Delete(keys.placement_key(vm))])
        return Outcome()

    async def _keep_pending(self, vm: Vm, record: bytes, message: str) -> None:
        """Say why the VM waits (its status and its ``vm why`` record), when that changed."""
        ops: list[Put | Delete] = []
        if vm.status.message != message or vm.status.state != "pending":
            vm.status.state = "pending"
            vm.status.message = message
            vm.updated_at = utcnow()
            ops.append(Objects.put(vm))
        old = self.ctx.informer.get(keys.placement_key(vm.name))
        if ops or old is None:
            ops.append(Put(keys.placement_key(vm.name), record))
        if not ops:
            return
        try:
            await self.ctx.commit(ops, [Objects.expect_unchanged(vm)])
        except Conflict:
            self._fresh.add(vm.name)
            self._wake()


class AllocationLoop:
    """Keeps each host's allocation record equal to the VM records placed there (a VM removed
    after its host's report, a resized VM, records from before allocation records existed)."""

    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    async def reconcile(self, node: str) -> Outcome:
        want = dict(self.ctx.placed_on(node))
        kv = self.ctx.informer.get(keys.alloc_key(node))
        have = Allocation.decode(kv) if kv is not None else Allocation()
        if kv is not None and have.vms == want:
            return Outcome()
        if kv is None and not want:
            return Outcome()
        gone = sorted(set(have.vms) - set(want))
        new = Allocation(want, have.revision)
        await self.ctx.commit([Put(keys.alloc_key(node), new.encode())], [have.expect(node)])
        what = f"released {', '.join(gone[:5])}" if gone else "updated"
        return Outcome(f"allocation of node {node} {what}: {len(want)} vms")


# -- drain and rebalance plans -------------------------------------------------------------


@dataclass(frozen=True)
class DrainStep:
    """One VM of a host to drain: where it would go, or what blocks it."""

    vm: str
    target: str | None
    blocker: str | None = None
    kind: str | None = None  # "fits-nowhere" | "pinned"

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "target": self.target, "blocker": self.blocker, "kind": self.kind}


def move_dict(m: Move) -> dict[str, Any]:
    return {
        "vm": m.vm,
        "source": m.source,
        "target": m.target,
        "score_before": m.score_before,
        "score_after": m.score_after,
    }


def plan_drain(
    snapshot: Snapshot,
    node: str,
    vms: dict[str, Vm],
    pin: Any,
) -> list[DrainStep]:
    """The drain plan of ``node`` over ``snapshot`` (pure; see ``drain_steps``)."""
    cordoned = tuple(replace(n, cordoned=True) if n.name == node else n for n in snapshot.nodes)
    snap = replace(snapshot, nodes=cordoned)
    sched = Scheduler(snap)
    ix: ClusterIndex = sched.index
    pos = ix.pos.get(node)
    if pos is None:
        return []
    names = sorted(ix.on_host[pos], key=lambda n: (-ix.vm_request[n].priority, n))
    steps = []
    for name in names:
        request = ix.vm_request[name]
        pinned_to = request.node_selector.get(HOST_LABEL)
        if pinned_to == node:
            vm = vms.get(name)
            pinned = pin(vm) if vm is not None else None
            volume = pinned[1] if pinned else "a local volume"
            steps.append(
                DrainStep(
                    name,
                    None,
                    f"vm {name} is pinned to {node}: volume {volume} lives on its own disk",
                    "pinned",
                )
            )
            continue
        plan = sched.schedule(replace(request, source=node))
        if plan.node is None:
            steps.append(DrainStep(name, None, plan.explain(), "fits-nowhere"))
            continue
        sched.move(name, plan.node)
        steps.append(DrainStep(name, plan.node))
    return steps
