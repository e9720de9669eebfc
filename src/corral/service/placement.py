"""Placement reads: ``vm why``, dry-run creates, capacity, and the moves a drain or a rebalance
would make. Nothing here writes: the leader places and moves VMs.

Every answer is computed from one read of the records (nodes, VMs, groups, allocation records,
volumes and pools, the cluster config) turned into the scheduler's snapshot exactly as the
leader does it (``control.placement.build_snapshot``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from corral.control.placement import (
    DrainStep,
    allocations,
    build_snapshot,
    move_dict,
    placement_record,
    plan_drain,
    vm_request,
)
from corral.errors import NotFound, ValidationFailed
from corral.model import (
    ClusterConfig,
    ClusterInfo,
    Group,
    Migration,
    Node,
    Pool,
    Vm,
    VmCreate,
    Volume,
)
from corral.model.common import new_id, utcnow
from corral.model.vm import VmStatus
from corral.scheduler import Scheduler, Snapshot, imbalance, plan_moves
from corral.service.context import ServiceContext
from corral.service.validate import parse
from corral.state import keys
from corral.state.codec import decode

__all__ = ["ClusterView", "PlacementService"]


@dataclass
class ClusterView:
    """One read of everything placement looks at."""

    nodes: list[Node]
    vms: list[Vm]
    groups: list[Group]
    volumes: dict[str, Volume]
    pools: dict[str, Pool]
    config: ClusterConfig
    snapshot: Snapshot

    def pin(self, vm: Vm) -> tuple[str, str] | None:
        """(host, volume) when one of the VM's volumes lives on one host's own disk."""
        for ref in vm.spec.disks:
            volume = self.volumes.get(ref.volume)
            if volume is None or volume.status.node is None:
                continue
            pool = self.pools.get(volume.spec.pool)
            if pool is not None and pool.spec.shared:
                continue
            return volume.status.node, volume.name
        return None


class PlacementService:
    def __init__(
        self,
        ctx: ServiceContext,
        cpu_allocation_ratio: float = 4.0,
        memory_allocation_ratio: float = 1.0,
    ) -> None:
        self.ctx = ctx
        self.ratios = (cpu_allocation_ratio, memory_allocation_ratio)

    async def view(self) -> ClusterView:
        objects = self.ctx.objects
        nodes, _ = await objects.all(Node)
        vms, _ = await objects.all(Vm)
        groups, _ = await objects.all(Group)
        volumes, _ = await objects.all(Volume)
        pools, _ = await objects.all(Pool)
        migrations, _ = await objects.all(Migration)
        records, _ = await self.ctx.store.list_all(keys.ALLOC_PREFIX)
        kv = await self.ctx.store.get(keys.CLUSTER)
        config = decode("cluster", kv.value, ClusterInfo).config if kv else ClusterConfig()
        view = ClusterView(
            nodes,
            vms,
            groups,
            {v.name: v for v in volumes},
            {p.name: p for p in pools},
            config,
            Snapshot(()),
        )
        view.snapshot = build_snapshot(
            nodes=nodes,
            vms=vms,
            groups=groups,
            allocs=allocations(records, vms),
            config=config,
            cpu_allocation_ratio=self.ratios[0],
            memory_allocation_ratio=self.ratios[1],
            pin=view.pin,
            migrations=migrations,
        )
        return view

    # -- vm why ------------------------------------------------------------------------------

    async def why(self, name: str) -> dict[str, Any]:
        """The scheduler's answer for a VM: its stored plan (the last decision), or, for a VM
        placed before plans were kept, the answer it would get now."""
        vm = await self.ctx.objects.get(Vm, name)
        kv = await self.ctx.store.get(keys.placement_key(name))
        record: dict[str, Any] | None = None
        if kv is not None:
            record = json.loads(kv.value)
            if record.get("vm_id") != vm.id:
                record = None
        current = record is None
        if record is None:
            view = await self.view()
            pinned = view.pin(vm)
            sched = Scheduler(view.snapshot)
            request = vm_request(vm, pinned, view.snapshot.groups)
            if vm.status.node is not None and vm.name in sched.index.vm_host:
                sched.index.remove(vm.name)  # as if it were not there yet
            plan = sched.schedule(request)
            record = json.loads(placement_record(vm, plan, plan.explain(), pinned))
        return {
            "kind": "placement",
            "name": name,
            "state": vm.status.state,
            "node": vm.status.node,
            "message": record.get("message", ""),
            "decided_at": record.get("decided_at"),
            "computed_now": current,
            "pinned": record.get("pinned"),
            "plan": record["plan"],
        }

    # -- dry run -----------------------------------------------------------------------------

    async def dry_run(self, body: Any) -> dict[str, Any]:
        """What ``POST /api/v1/vms`` would do with ``body``: validated, planned, not written."""
        req = parse(VmCreate, body)
        view = await self.view()
        await self.check_refs(req.group)
        if any(v.name == req.name for v in view.vms):
            raise ValidationFailed.one(
                "name", "unique", f"vm {req.name!r} already exists; pick another name"
            )
        now = utcnow()
        vm = Vm(
            name=req.name,
            id=new_id(),
            created_at=now,
            updated_at=now,
            spec=req.spec(),
            status=VmStatus(state="pending"),
        )
        for i, ref in enumerate(req.disks):
            if ref.volume not in view.volumes:
                raise ValidationFailed.one(
                    f"disks.{i}.volume",
                    "exists",
                    f"no volume {ref.volume!r}; see `corral volume ls`",
                )
        pinned = view.pin(vm)
        plan = Scheduler(view.snapshot).schedule(vm_request(vm, pinned, view.snapshot.groups))
        message = plan.explain()
        if pinned is not None:
            message = f"volume {pinned[1]} lives on host {pinned[0]}: {message}"
        record = json.loads(placement_record(vm, plan, message, pinned))
        vm_data = vm.model_dump(mode="json")
        vm_data.pop("id", None)
        return {
            "dry_run": True,
            "would": "place" if plan.node else "stay-pending",
            "node": plan.node,
            "message": message,
            "object": vm_data,
            "placement": record["plan"],
        }

    async def check_refs(self, group: str | None) -> None:
        """Refuse (422) a VM naming a placement group that does not exist."""
        if group is not None and await self.ctx.objects.find(Group, group) is None:
            raise ValidationFailed.one(
                "group",
                "exists",
                f"no placement group {group!r}; create it with `corral group create {group}`",
            )

    # -- capacity ----------------------------------------------------------------------------

    async def capacity(
        self, vcpus: int, memory_mib: int, tolerate_failures: int = 0
    ) -> dict[str, Any]:
        """How many more VMs of this shape fit, per host and in total.

        With ``tolerate_failures=k`` the total keeps enough room that, if any k hosts fail,
        every VM (old and new) still fits on the others: total free must stay at least the
        capacity of the k biggest hosts, per resource (the N+k rule, counted in resources, not
        slots: fragmentation is ignored).
        """
        if vcpus < 1:
            raise ValidationFailed.one("vcpus", "ge", "must be >= 1")
        if memory_mib < 1:
            raise ValidationFailed.one("memory_mib", "ge", "must be >= 1")
        if tolerate_failures < 0:
            raise ValidationFailed.one("tolerate_failures", "ge", "must be >= 0")
        view = await self.view()
        sched = Scheduler(view.snapshot)
        ix = sched.index
        eligible = set(sched.eligible)
        hosts = []
        total = 0
        free_cpu = free_mem = 0
        caps: list[tuple[int, int]] = []
        for i, node in enumerate(view.snapshot.nodes):
            cpu_free = ix.cpu_cap[i] - ix.cpu_used[i]
            mem_free = ix.mem_cap[i] - ix.mem_used[i]
            fit = max(0, min(cpu_free // vcpus, mem_free // memory_mib)) if i in eligible else 0
            row: dict[str, Any] = {
                "node": node.name,
                "fits": fit,
                "vcpus": {"capacity": ix.cpu_cap[i], "used": ix.cpu_used[i]},
                "memory_mib": {"capacity": ix.mem_cap[i], "used": ix.mem_used[i]},
                "eligible": i in eligible,
            }
            if i not in eligible:
                _, why = sched._host_rejected.get(i, ("", ""))
                row["reason"] = why
            else:
                total += fit
                free_cpu += max(cpu_free, 0)
                free_mem += max(mem_free, 0)
                caps.append((ix.cpu_cap[i], ix.mem_cap[i]))
            hosts.append(row)
        answer: dict[str, Any] = {
            "kind": "capacity",
            "shape": {"vcpus": vcpus, "memory_mib": memory_mib},
            "total": total,
            "nodes": hosts,
        }
        if tolerate_failures:
            k = tolerate_failures
            if k >= len(caps):
                tolerant = 0
            else:
                top_cpu = sum(sorted((c for c, _ in caps), reverse=True)[:k])
                top_mem = sum(sorted((m for _, m in caps), reverse=True)[:k])
                tolerant = max(
                    0,
                    min(
                        total,
                        math.floor((free_cpu - top_cpu) / vcpus),
                        math.floor((free_mem - top_mem) / memory_mib),
                    ),
                )
            answer["tolerate_failures"] = k
            answer["total_tolerating_failures"] = tolerant
            answer["rule"] = (
                f"after any {k} host failure(s), every VM still fits on the remaining hosts "
                "(counted in vCPUs and memory)"
            )
        return answer

    # -- drain and rebalance -------------------------------------------------------------------

    async def drain_steps(self, node: str) -> list[DrainStep]:
        """Where each VM of ``node`` would go if the host were cordoned now, moved one after the
        other (each move counted before the next); blockers say why a VM cannot move."""
        view = await self.view()
        if not any(n.name == node for n in view.nodes):
            raise NotFound(f"node {node!r} not found")
        return plan_drain(view.snapshot, node, {v.name: v for v in view.vms}, view.pin)

    async def rebalance(self, max_moves: int, min_gain: float) -> dict[str, Any]:
        view = await self.view()
        before = imbalance(view.snapshot)
        moves = plan_moves(view.snapshot, min_gain=min_gain, max_moves=max_moves)
        return {
            "kind": "rebalance-plan",
            "score_before": before,
            "score_after": moves[-1].score_after if moves else before,
            "moves": [move_dict(m) for m in moves],
        }
