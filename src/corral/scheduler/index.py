"""Per-snapshot indexes the filters and scorers read, built once and kept up to date.

A :class:`ClusterIndex` turns a :class:`Snapshot` into flat per-host lists (capacity, usage,
free room), where each VM is, and how many members of each group sit on each host. ``place``,
``remove`` and ``move`` change it in O(1) per VM so that many placements in a row, or a
rebalancer trying moves, never rebuild it. Hosts are addressed by their position in
``snapshot.nodes``.

So that one placement costs little more than a pass over the candidates at C speed, it also
keeps, up to date through the same three calls: which hosts are short of room (:class:`Room`),
score columns over every host by request shape (``column``: only the hosts changed since are
computed again), group members per failure domain and the hosts an anti-affinity group fills.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable
from itertools import compress
from typing import Any, TypeVar, cast

from corral.scheduler.snapshot import Group, NodeView, PlacedVm, Request, Snapshot

__all__ = ["ClusterIndex", "Room", "cpu_capacity", "memory_capacity"]

T = TypeVar("T")


def cpu_capacity(snapshot: Snapshot, node: NodeView) -> int:
    """vCPUs the host may carry: ``(cpus - reserved) * ratio``, rounded down."""
    ratio = node.cpu_allocation_ratio or snapshot.cpu_allocation_ratio
    return max(0, math.floor((node.cpus - node.reserved_vcpus) * ratio))


def memory_capacity(snapshot: Snapshot, node: NodeView) -> int:
    """MiB the host may carry: ``(memory - reserved) * ratio``, rounded down."""
    ratio = node.memory_allocation_ratio or snapshot.memory_allocation_ratio
    return max(0, math.floor((node.memory_mib - node.reserved_memory_mib) * ratio))


class Room:
    """Free room per host of one resource (``free``, the index's own list), and which hosts
    have less than ``threshold`` free: those are the only ones a VM needing at most
    ``threshold`` can fail to fit, so most checks look at none or a few hosts."""

    __slots__ = ("free", "short", "shorts", "threshold")

    # Up to this many short hosts, each is looked up among the candidates by bisection;
    # beyond it the candidates are scanned.
    BISECT_UP_TO = 32

    def __init__(self, free: list[int]) -> None:
        self.free = free
        self._rebuild(0)

    def _rebuild(self, threshold: int) -> None:
        self.threshold = threshold
        self.short = [f < threshold for f in self.free]  # per host
        self.shorts = set(compress(range(len(self.free)), self.short))  # those hosts

    def set(self, i: int, value: int) -> None:
        """Host ``i`` now has ``value`` free."""
        self.free[i] = value
        short = value < self.threshold
        if short != self.short[i]:
            self.short[i] = short
            if short:
                self.shorts.add(i)
            else:
                self.shorts.discard(i)

    def lacking(self, hosts: list[int], need: int) -> list[int]:
        """The hosts of ``hosts`` (ascending, as the stack passes them) with less than ``need``
        free, in order."""
        if need > self.threshold:
            self._rebuild(need)
        if not self.shorts:
            return []
        free = self.free
        if len(self.shorts) > self.BISECT_UP_TO:
            short = self.short
            return [i for i in compress(hosts, map(short.__getitem__, hosts)) if free[i] < need]
        # A few short hosts: find each among the candidates by bisection.
        out = []
        n = len(hosts)
        for i in sorted(self.shorts):
            if free[i] < need:
                k = bisect_left(hosts, i)
                if k < n and hosts[k] == i:
                    out.append(i)
        return out


class ClusterIndex:
    """Mutable, per-snapshot view: what each host can take and what it carries now."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        nodes = snapshot.nodes
        self.nodes = nodes
        self.names: list[str] = [n.name for n in nodes]
        self.pos: dict[str, int] = {n.name: i for i, n in enumerate(nodes)}
        if len(self.pos) != len(nodes):
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"snapshot: node names must be unique (repeated: {dupes})")
        self.cpu_cap: list[int] = [cpu_capacity(snapshot, n) for n in nodes]
        self.mem_cap: list[int] = [memory_capacity(snapshot, n) for n in nodes]
        self.cpu_used: list[int] = [n.used_vcpus for n in nodes]
        self.mem_used: list[int] = [n.used_memory_mib for n in nodes]
        # cap - used, kept up to date, and which hosts are short of room (see Room).
        self.cpu_free: list[int] = [c - u for c, u in zip(self.cpu_cap, self.cpu_used, strict=True)]
        self.mem_free: list[int] = [c - u for c, u in zip(self.mem_cap, self.mem_used, strict=True)]
        self.cpu_room = Room(self.cpu_free)
        self.mem_room = Room(self.mem_free)
        self.vm_count: list[int] = [n.vms for n in nodes]
        self.pool_cap: list[dict[str, int]] = [
            {p: v.capacity_bytes for p, v in n.pools.items()} for n in nodes
        ]
        self.pool_used: list[dict[str, int]] = [
            {p: v.used_bytes for p, v in n.pools.items()} for n in nodes
        ]
        # Per local pool: the hosts that have it, and each host's free bytes (0 without it).
        self.pool_hosts: dict[str, frozenset[int]] = {}
        self.pool_free: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for p, v in n.pools.items():
                self.pool_hosts[p] = self.pool_hosts.get(p, frozenset()) | {i}
                self.pool_free.setdefault(p, [0] * len(nodes))[i] = v.capacity_bytes - v.used_bytes
        self.pool_room: dict[str, Room] = {p: Room(free) for p, free in self.pool_free.items()}
        # 1 / capacity (0 where the capacity is 0), so scorers multiply instead of divide.
        self.cpu_inv: list[float] = [1.0 / c if c > 0 else 0.0 for c in self.cpu_cap]
        self.mem_inv: list[float] = [1.0 / c if c > 0 else 0.0 for c in self.mem_cap]
        # Half of 1 / capacity, and per host the mean used fraction of vCPU and memory: a spread
        # score is then ``1 - load[i] - vcpus * cpu_half[i] - memory * mem_half[i]``.
        self.cpu_half: list[float] = [x * 0.5 for x in self.cpu_inv]
        self.mem_half: list[float] = [x * 0.5 for x in self.mem_inv]
        self.load: list[float] = [self._load(i) for i in range(len(nodes))]
        self.kvm_hosts: frozenset[int] = frozenset(
            i for i, n in enumerate(nodes) if "kvm" in n.accelerators
        )
        self.shared_cap: dict[str, int] = {
            p: v.capacity_bytes for p, v in snapshot.shared_pools.items()
        }
        self.shared_used: dict[str, int] = {
            p: v.used_bytes for p, v in snapshot.shared_pools.items()
        }
        self.groups: dict[str, Group] = dict(snapshot.groups)
        # Where each listed VM is, what it asked for, and who is where.
        self.vm_host: dict[str, int] = {}
        self.vm_request: dict[str, Request] = {}
        self.on_host: list[set[str]] = [set() for _ in nodes]
        # group -> host index -> members there (only hosts with at least one member).
        self.group_hosts: dict[str, dict[int, int]] = {}
        # priority -> host index -> VMs of that priority there (only hosts with one or more).
        self.priority_hosts: dict[int, dict[int, int]] = {}
        # vm -> the VMs whose hard affinity names it (they must stay with it).
        self.affinity_refs: dict[str, set[str]] = {}
        # label key -> host index -> value (only hosts that carry the key); filled on demand.
        self._label_cache: dict[str, dict[int, str]] = {}
        # label key -> per host its value or None; (label key, value) -> per host whether it
        # carries exactly that value. Both filled on demand.
        self._label_values: dict[str, list[str | None]] = {}
        self._label_masks: dict[tuple[str, str], list[bool]] = {}
        # Anything else computed from the snapshot alone, by key (see ``static``).
        self._static: dict[Hashable, Any] = {}
        # Per-host score columns over every host, by key (see ``column``), and the hosts whose
        # usage or membership changed, in order: a column remembers how much of it it has seen.
        self._columns: dict[Hashable, tuple[list[Any], list[int]]] = {}
        # group -> label key -> label value -> members of the group on hosts with that value;
        # filled on demand (see ``domain_counts``), kept up to date by place/remove/move.
        self._domain_counts: dict[str, dict[str, dict[str, int]]] = {}
        # group -> limit -> hosts with at least ``limit`` members; on demand (``full_hosts``).
        self._full_hosts: dict[str, dict[int, set[int]]] = {}
        self._changed: list[int] = []
        self._track_all(snapshot.vms)

    def _track_all(self, vms: Iterable[PlacedVm]) -> None:
        for vm in vms:
            i = self.pos.get(vm.node)
            if i is None:
                raise ValueError(f"snapshot: vm {vm.name} is on unknown node {vm.node}")
            if vm.name in self.vm_host:
                raise ValueError(f"snapshot: vm {vm.name} is listed twice")
            self._link(vm.request, i)

    # -- membership bookkeeping (usage figures are separate: the snapshot's are authoritative)

    def _link(self, request: Request, i: int) -> None:
        if self._columns:
            self._touch(i)
        self.vm_host[request.vm] = i
        self.vm_request[request.vm] = request
        self.on_host[i].add(request.vm)
        if request.group is not None:
            per_host = self.group_hosts.setdefault(request.group, {})
            per_host[i] = per_host.get(i, 0) + 1
            if self._domain_counts:
                self._count_domains(request.group, i, +1)
            if self._full_hosts:
                self._mark_full(request.group, i, per_host[i])
        if request.affinity_vm is not None:
            self.affinity_refs.setdefault(request.affinity_vm, set()).add(request.vm)
        at = self.priority_hosts.setdefault(request.priority, {})
        at[i] = at.get(i, 0) + 1

    def _unlink(self, vm: str) -> tuple[Request, int]:
        i = self.vm_host.pop(vm)
        request = self.vm_request.pop(vm)
        self._touch(i)
        self.on_host[i].discard(vm)
        if request.group is not None:
            per_host = self.group_hosts[request.group]
            per_host[i] -= 1
            self._count_domains(request.group, i, -1)
            self._mark_full(request.group, i, per_host[i])
            if per_host[i] == 0:
                del per_host[i]
        at = self.priority_hosts[request.priority]
        at[i] -= 1
        if at[i] == 0:
            del at[i]
        if request.affinity_vm is not None:
            refs = self.affinity_refs[request.affinity_vm]
            refs.discard(vm)
            if not refs:
                del self.affinity_refs[request.affinity_vm]
        return request, i

    def _count_domains(self, group: str, i: int, sign: int) -> None:
        by_key = self._domain_counts.get(group)
        if by_key:
            for key, counts in by_key.items():
                d = self.labels_of(key).get(i)
                if d is not None:
                    counts[d] = counts.get(d, 0) + sign

    def _mark_full(self, group: str, i: int, members: int) -> None:
        by_limit = self._full_hosts.get(group)
        if by_limit:
            for limit, full in by_limit.items():
                if members >= limit:
                    full.add(i)
                else:
                    full.discard(i)

    def _touch(self, i: int) -> None:
        """Host ``i``'s usage or membership changes: its cached column values are stale."""
        if not self._columns:
            return  # nothing cached that could go stale (a column is built from the state)
        changed = self._changed
        changed.append(i)
        if len(changed) > 2 * len(self.nodes) + 64:
            # Recomputing the columns is then about as cheap as replaying the log: drop both.
            changed.clear()
            self._columns.clear()

    def _load(self, i: int) -> float:
        return self.cpu_used[i] * self.cpu_half[i] + self.mem_used[i] * self.mem_half[i]

    def _add_usage(self, request: Request, i: int, sign: int, *, shared: bool) -> None:
        self._touch(i)
        self.cpu_used[i] += sign * request.vcpus
        self.mem_used[i] += sign * request.memory_mib
        self.cpu_room.set(i, self.cpu_free[i] - sign * request.vcpus)
        self.mem_room.set(i, self.mem_free[i] - sign * request.memory_mib)
        self.load[i] = self._load(i)
        self.vm_count[i] += sign
        for pool, size in request.disks.items():
            if pool in self.shared_cap:
                if shared:
                    self.shared_used[pool] += sign * size
            else:
                used = self.pool_used[i]
                used[pool] = used.get(pool, 0) + sign * size
                room = self.pool_room.get(pool)
                if room is not None:
                    room.set(i, room.free[i] - sign * size)

    # -- changes

    def place(self, request: Request, host: int) -> None:
        """Put a new VM on ``host``: it takes its resources there from now on."""
        if request.vm in self.vm_host:
            raise ValueError(f"vm {request.vm} is already placed")
        self._link(request, host)
        self._add_usage(request, host, +1, shared=True)

    def remove(self, vm: str) -> None:
        """Forget a VM and give back what it took."""
        request, i = self._unlink(vm)
        self._add_usage(request, i, -1, shared=True)

    def move(self, vm: str, host: int) -> None:
        """Live-migrate a listed VM: its usage leaves its host and lands on ``host``
        (shared-pool disks stay where they are)."""
        request, i = self._unlink(vm)
        self._add_usage(request, i, -1, shared=False)
        self._link(request, host)
        self._add_usage(request, host, +1, shared=False)

    # -- reads

    def column(
        self, key: Hashable, every: Callable[[], list[T]], one: Callable[[int], T]
    ) -> list[T]:
        """A per-host value over every host (``every()``; ``one(i)`` for host ``i`` alone) that
        depends only on that host's usage and membership and on ``key``, kept between calls:
        only the hosts changed since the last call with ``key`` are computed again.
        Read-only: it is the index's own list."""
        changed = self._changed
        hit = self._columns.get(key)
        if hit is None:
            if len(self._columns) >= 32:
                # Bounded memory: 32 request shapes at most (columns are rebuilt on demand).
                self._columns.clear()
            col = every()
            self._columns[key] = (col, [len(changed)])
            return col
        col, seen = hit
        if seen[0] != len(changed):
            for i in set(changed[seen[0] :]):
                col[i] = one(i)
            seen[0] = len(changed)
        return col

    def static(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``, computed once per index: for what depends on the snapshot alone (host
        labels, accelerators), never on usage or VMs. Read-only."""
        try:
            return cast(T, self._static[key])
        except KeyError:
            hit = self._static[key] = build()
            return hit

    def label_values(self, key: str) -> list[str | None]:
        """Per host: the value of its label ``key``, or None without it. Read-only."""
        hit = self._label_values.get(key)
        if hit is None:
            hit = self._label_values[key] = [n.labels.get(key) for n in self.nodes]
        return hit

    def label_mask(self, key: str, value: str) -> list[bool]:
        """Per host: does it carry label ``key`` with exactly ``value``. Read-only."""
        hit = self._label_masks.get((key, value))
        if hit is None:
            hit = [n.labels.get(key) == value for n in self.nodes]
            self._label_masks[key, value] = hit
        return hit

    def labels_of(self, key: str) -> dict[int, str]:
        """Host index -> value of label ``key``, for hosts that carry it."""
        hit = self._label_cache.get(key)
        if hit is None:
            values = self.label_values(key)
            hit = {i: v for i, v in enumerate(values) if v is not None}
            self._label_cache[key] = hit
        return hit

    def group_column(self, group: str) -> list[int]:
        """Per host: members of ``group`` there (see ``column``). Read-only."""
        per_host = self.group_hosts.get(group, {})

        def every() -> list[int]:
            col = [0] * len(self.nodes)
            for i, n in per_host.items():
                col[i] = n
            return col

        def one(i: int) -> int:
            return self.group_hosts.get(group, {}).get(i, 0)

        return self.column(("group", group), every, one)

    def domain_counts(
        self, group: str, key: str, *, excluding: str | None = None
    ) -> dict[str, int]:
        """Label value of ``key`` -> members of ``group`` on hosts with that value, not counting
        the VM ``excluding`` (values with none may be absent). Read-only: it may be the index's
        own dict."""
        by_key = self._domain_counts.setdefault(group, {})
        counts = by_key.get(key)
        if counts is None:
            domain_of = self.labels_of(key)
            counts = by_key[key] = {}
            for i, n in self.group_hosts.get(group, {}).items():
                d = domain_of.get(i)
                if d is not None:
                    counts[d] = counts.get(d, 0) + n
        req = self.vm_request.get(excluding) if excluding is not None else None
        if req is None or req.group != group:
            return counts
        d = self.labels_of(key).get(self.vm_host[req.vm])
        if d is None:
            return counts
        adjusted = dict(counts)
        adjusted[d] -= 1
        return adjusted

    def full_hosts(self, group: str, limit: int, *, excluding: str | None = None) -> set[int]:
        """The hosts holding ``limit`` or more members of ``group``, not counting the VM
        ``excluding``. Read-only: it may be the index's own set."""
        by_limit = self._full_hosts.setdefault(group, {})
        full = by_limit.get(limit)
        if full is None:
            per_host = self.group_hosts.get(group, {})
            full = by_limit[limit] = {i for i, n in per_host.items() if n >= limit}
        req = self.vm_request.get(excluding) if excluding is not None else None
        if req is None or req.group != group:
            return full
        i = self.vm_host[req.vm]
        if self.group_hosts[group][i] - 1 >= limit:
            return full
        return full - {i}

    def group_counts(self, group: str, *, excluding: str | None = None) -> dict[int, int]:
        """Host index -> members of ``group`` there, not counting the VM ``excluding``
        (hosts with none are absent). Read-only: it may be the index's own dict."""
        per_host = self.group_hosts.get(group, {})
        req = self.vm_request.get(excluding) if excluding is not None else None
        if req is None or req.group != group:
            return per_host
        i = self.vm_host[req.vm]
        adjusted = dict(per_host)
        adjusted[i] -= 1
        if adjusted[i] == 0:
            del adjusted[i]
        return adjusted

    def members_on(self, group: str, host: int, *, excluding: str | None = None) -> int:
        """Members of ``group`` on ``host``, not counting the VM ``excluding``."""
        n = self.group_hosts.get(group, {}).get(host, 0)
        if excluding is not None and self.vm_host.get(excluding) == host:
            req = self.vm_request[excluding]
            if req.group == group:
                n -= 1
        return n

    def group_size(self, group: str, *, excluding: str | None = None) -> int:
        n = sum(self.group_hosts.get(group, {}).values())
        req = self.vm_request.get(excluding) if excluding is not None else None
        if req is not None and req.group == group:
            n -= 1
        return n

    def cpu_util(self, i: int) -> float:
        return self.cpu_used[i] / self.cpu_cap[i] if self.cpu_cap[i] > 0 else 0.0

    def mem_util(self, i: int) -> float:
        return self.mem_used[i] / self.mem_cap[i] if self.mem_cap[i] > 0 else 0.0

    def disk_util(self, i: int) -> float | None:
        """Fill of the host's local pools together, or None when it has none."""
        cap = sum(self.pool_cap[i].values())
        if cap <= 0:
            return None
        return sum(self.pool_used[i].values()) / cap
