"""Rebalancing: how uneven the cluster is, and which live migrations make it less so.

The **imbalance score** follows Ganeti's hbal: for each resource, the population standard
deviation of the per-host utilisation (used / capacity after overcommit and reservations), then
the weighted sum over resources (``WEIGHTS``: vCPU, memory, local disk). 0 is perfectly even.
Only hosts that may take VMs count (ready, compute role, not cordoned, not in maintenance);
disk counts over the hosts that have local pools.

The **planner** is greedy, like hbal: at each step it tries moving each movable VM to each host,
takes the move that lowers the score most, re-checks it with every hard filter of the scheduler
(capacity, labels, pools, KVM, QEMU/machine type, affinity, anti-affinity, failure domains) as a
live migration from its current host, applies it to its own copy of the cluster, and repeats.
It stops when the best move gains less than ``min_gain``, after ``max_moves`` moves (the budget
of concurrent migrations), or when nothing can move. A VM moves at most once per plan; VMs in
``held_down_vms`` (recently migrated, or migrating now) do not move at all. To stay fast on big
clusters it takes source VMs only from the ``SOURCE_HOSTS`` hosts that add most to the score
and tries only the ``TARGET_HOSTS`` least used hosts as targets.
Every move's ``score_after`` is recomputed exactly, so the score never goes up.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace

from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Snapshot
from corral.scheduler.stack import Scheduler

__all__ = ["SOURCE_HOSTS", "TARGET_HOSTS", "WEIGHTS", "Move", "imbalance", "plan_moves"]

# Resource -> weight in the imbalance score.
WEIGHTS: dict[str, float] = {"cpu": 1.0, "memory": 1.0, "disk": 1.0}
# How many of the most unbalanced hosts the planner takes VMs from at each step, and how many
# of the least used hosts it tries as targets (a full search is O(VMs x hosts) per move).
SOURCE_HOSTS = 16
TARGET_HOSTS = 64
# Moves that gain less than this are float noise, whatever min_gain says.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Move:
    """One live migration, with the cluster's imbalance score before and after it."""

    vm: str
    source: str
    target: str
    score_before: float
    score_after: float

    @property
    def gain(self) -> float:
        return self.score_before - self.score_after

    def describe(self) -> str:
        return (
            f"migrate vm {self.vm} from {self.source} to {self.target} "
            f"(imbalance {self.score_before:.4f} -> {self.score_after:.4f})"
        )


def _utils(ix: ClusterIndex, i: int) -> tuple[float, float, float | None]:
    return ix.cpu_util(i), ix.mem_util(i), ix.disk_util(i)


def _score(ix: ClusterIndex, hosts: Collection[int]) -> float:
    """The weighted sum of per-resource standard deviations over ``hosts``."""
    if not hosts:
        return 0.0
    cpu, mem, disk = [], [], []
    for i in hosts:
        c, m, d = _utils(ix, i)
        cpu.append(c)
        mem.append(m)
        if d is not None:
            disk.append(d)
    return (
        WEIGHTS["cpu"] * _pstdev(cpu)
        + WEIGHTS["memory"] * _pstdev(mem)
        + WEIGHTS["disk"] * _pstdev(disk)
    )


def _pstdev(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def imbalance(snapshot: Snapshot) -> float:
    """The cluster's imbalance score (0 = every host equally used); see the module doc."""
    sched = Scheduler(snapshot)
    return _score(sched.index, sched.eligible)


class _Sums:
    """Running sums and sums of squares per resource, for O(1) "what if" scores."""

    def __init__(self, ix: ClusterIndex, hosts: Collection[int]) -> None:
        self.n = [0, 0, 0]
        self.s = [0.0, 0.0, 0.0]
        self.q = [0.0, 0.0, 0.0]
        for i in hosts:
            for k, u in enumerate(_utils(ix, i)):
                if u is not None:
                    self.n[k] += 1
                    self.s[k] += u
                    self.q[k] += u * u

    def score_with(
        self,
        changes: list[tuple[int, float, float]],
    ) -> float:
        """The score if, for each (resource, old, new), one host's utilisation changed."""
        s, q = list(self.s), list(self.q)
        for k, old, new in changes:
            s[k] += new - old
            q[k] += new * new - old * old
        total = 0.0
        for k, w in enumerate((WEIGHTS["cpu"], WEIGHTS["memory"], WEIGHTS["disk"])):
            n = self.n[k]
            if n >= 2:
                mean = s[k] / n
                total += w * math.sqrt(max(q[k] / n - mean * mean, 0.0))
        return total


def plan_moves(
    snapshot: Snapshot,
    *,
    min_gain: float = 0.01,
    max_moves: int = 4,
    held_down_vms: Collection[str] = (),
) -> list[Move]:
    """Live migrations that lower :func:`imbalance`, best first, each valid after the ones
    before it. Raises ValueError for a negative ``min_gain`` or ``max_moves``."""
    if min_gain < 0:
        raise ValueError("min_gain: must be >= 0 (the least score gain worth one migration)")
    if max_moves < 0:
        raise ValueError("max_moves: must be >= 0 (the budget of concurrent migrations)")
    sched = Scheduler(snapshot)
    ix = sched.index
    hosts = set(sched.eligible)
    held = set(held_down_vms)
    moves: list[Move] = []
    current = _score(ix, hosts)
    while len(moves) < max_moves:
        move = _best_move(sched, hosts, held, current, min_gain)
        if move is None:
            break
        moves.append(move)
        held.add(move.vm)
        current = move.score_after
    return moves


def _best_move(
    sched: Scheduler, hosts: set[int], held: set[str], current: float, min_gain: float
) -> Move | None:
    ix = sched.index
    sums = _Sums(ix, hosts)
    n = [max(x, 1) for x in sums.n]
    means = [sums.s[k] / n[k] for k in range(3)]

    def deviation(i: int) -> float:
        return sum((u - means[k]) ** 2 for k, u in enumerate(_utils(ix, i)) if u is not None)

    sources = sorted(hosts, key=lambda i: (-deviation(i), ix.names[i]))[:SOURCE_HOSTS]

    def used(i: int) -> float:
        return sum(u for u in _utils(ix, i) if u is not None)

    targets = sorted(hosts, key=lambda i: (used(i), ix.names[i]))[:TARGET_HOSTS]
    candidates: list[tuple[float, str, str, int]] = []
    for s in sources:
        su = _utils(ix, s)
        for vm in sorted(ix.on_host[s]):
            if vm in held:
                continue
            req = ix.vm_request[vm]
            local = sum(b for p, b in req.disks.items() if p not in ix.shared_cap)
            s_after = _after(ix, s, -req.vcpus, -req.memory_mib, -local)
            for t in targets:
                if t == s:
                    continue
                t_after = _after(ix, t, req.vcpus, req.memory_mib, local)
                changes: list[tuple[int, float, float]] = []
                for pair in (
                    zip(su, s_after, strict=True),
                    zip(_utils(ix, t), t_after, strict=True),
                ):
                    for k, (old, new) in enumerate(pair):
                        if old is not None and new is not None:
                            changes.append((k, old, new))
                after = sums.score_with(changes)
                if current - after >= max(min_gain, _EPSILON):
                    candidates.append((after, vm, ix.names[t], s))
    candidates.sort()
    feasible_for: dict[str, set[str]] = {}
    for _, vm, target, s in candidates:
        ok = feasible_for.get(vm)
        if ok is None:
            req = ix.vm_request[vm]
            source = ix.nodes[s]
            migration = replace(req, source=source.name, source_qemu_version=source.qemu_version)
            fit, _ = sched.feasible(migration)
            ok = {ix.names[i] for i in fit}
            feasible_for[vm] = ok
        if target not in ok:
            continue
        sched.move(vm, target)
        exact = _score(ix, hosts)
        if current - exact >= max(min_gain, _EPSILON):
            return Move(vm, ix.names[s], target, current, exact)
        sched.move(vm, ix.names[s])
    return None


def _after(
    ix: ClusterIndex, i: int, vcpus: int, memory_mib: int, local_bytes: int
) -> tuple[float, float, float | None]:
    """Host ``i``'s utilisations if its usage changed by these amounts."""
    cpu = (ix.cpu_used[i] + vcpus) / ix.cpu_cap[i] if ix.cpu_cap[i] else 0.0
    mem = (ix.mem_used[i] + memory_mib) / ix.mem_cap[i] if ix.mem_cap[i] else 0.0
    cap = sum(ix.pool_cap[i].values())
    disk = (sum(ix.pool_used[i].values()) + local_bytes) / cap if cap > 0 else None
    return cpu, mem, disk
