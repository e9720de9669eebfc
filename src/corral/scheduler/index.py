"""Per-snapshot indexes the filters and scorers read, built once and kept up to date.

A :class:`ClusterIndex` turns a :class:`Snapshot` into flat per-host lists (capacity, usage),
where each VM is, and how many members of each group sit on each host. ``place``, ``remove`` and
``move`` change it in O(1) per VM so that many placements in a row, or a rebalancer trying moves,
never rebuild it. Hosts are addressed by their position in ``snapshot.nodes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from corral.scheduler.snapshot import Group, NodeView, PlacedVm, Request, Snapshot

__all__ = ["ClusterIndex", "cpu_capacity", "memory_capacity"]


def cpu_capacity(snapshot: Snapshot, node: NodeView) -> int:
    """vCPUs the host may carry: ``(cpus - reserved) * ratio``, rounded down."""
    ratio = node.cpu_allocation_ratio or snapshot.cpu_allocation_ratio
    return max(0, math.floor((node.cpus - node.reserved_vcpus) * ratio))


def memory_capacity(snapshot: Snapshot, node: NodeView) -> int:
    """MiB the host may carry: ``(memory - reserved) * ratio``, rounded down."""
    ratio = node.memory_allocation_ratio or snapshot.memory_allocation_ratio
    return max(0, math.floor((node.memory_mib - node.reserved_memory_mib) * ratio))


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
        self.vm_host[request.vm] = i
        self.vm_request[request.vm] = request
        self.on_host[i].add(request.vm)
        if request.group is not None:
            per_host = self.group_hosts.setdefault(request.group, {})
            per_host[i] = per_host.get(i, 0) + 1
        if request.affinity_vm is not None:
            self.affinity_refs.setdefault(request.affinity_vm, set()).add(request.vm)
        at = self.priority_hosts.setdefault(request.priority, {})
        at[i] = at.get(i, 0) + 1

    def _unlink(self, vm: str) -> tuple[Request, int]:
        i = self.vm_host.pop(vm)
        request = self.vm_request.pop(vm)
        self.on_host[i].discard(vm)
        if request.group is not None:
            per_host = self.group_hosts[request.group]
            per_host[i] -= 1
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

    def _load(self, i: int) -> float:
        return self.cpu_used[i] * self.cpu_half[i] + self.mem_used[i] * self.mem_half[i]

    def _add_usage(self, request: Request, i: int, sign: int, *, shared: bool) -> None:
        self.cpu_used[i] += sign * request.vcpus
        self.mem_used[i] += sign * request.memory_mib
        self.load[i] = self._load(i)
        self.vm_count[i] += sign
        for pool, size in request.disks.items():
            if pool in self.shared_cap:
                if shared:
                    self.shared_used[pool] += sign * size
            else:
                used = self.pool_used[i]
                used[pool] = used.get(pool, 0) + sign * size
                free = self.pool_free.get(pool)
                if free is not None:
                    free[i] -= sign * size

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

    def labels_of(self, key: str) -> dict[int, str]:
        """Host index -> value of label ``key``, for hosts that carry it."""
        hit = self._label_cache.get(key)
        if hit is None:
            hit = {i: n.labels[key] for i, n in enumerate(self.nodes) if key in n.labels}
            self._label_cache[key] = hit
        return hit

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
