"""Live-migration use-cases: ``POST /vms/{name}/migrate`` (a task, or a dry run) and the
migration half of ``POST /tasks/{id}/cancel`` (``OperationService.cancel`` dispatches). The
leader's migration loop does the work (``corral.control.migrations``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from corral.control.migrations import migration_records
from corral.control.placement import vm_request
from corral.errors import Conflict, NodeReason, NotFound, Unschedulable, ValidationFailed
from corral.model import Migration, Node, Pool, Task, Vm, Volume, cpu_gap
from corral.model.migration import MigrationOptions, MigrationRequest
from corral.scheduler import Plan, schedule
from corral.service.context import RequestMeta, ServiceContext
from corral.service.placement import PlacementService
from corral.service.validate import parse
from corral.service.vms import Accepted

__all__ = ["MigrationService"]

_LIVE_STATES = frozenset({"running", "paused"})


class MigrationService:
    def __init__(self, ctx: ServiceContext, placement: PlacementService | None = None) -> None:
        self.ctx = ctx
        self.placement = placement or PlacementService(ctx)

    async def plan(self, name: str, req: MigrationRequest) -> tuple[Vm, str, str, list[str], Plan]:
        """(vm, target, why, local volumes, the scheduler's plan) or the error saying why it
        cannot migrate now. Hosts are judged on the same snapshot the leader places with
        (allocation records, reservations, cordons, placement groups, migrations under way),
        with the migration filter (not the source); a volume on the source's own disk does not
        pin the VM (a live migration mirrors it)."""
        vm = await self.ctx.objects.get(Vm, name)
        if vm.deleting:
            raise Conflict(f"vm {name!r} is being deleted")
        current = await self.ctx.objects.find(Migration, name)
        if current is not None and not current.final:
            raise Conflict(
                f"vm {name!r} is already migrating to {current.spec.target} (task "
                f"{current.spec.task}); cancel it with `corral task cancel {current.spec.task}`"
            )
        source = vm.status.node
        if source is None or vm.status.state not in _LIVE_STATES:
            raise Conflict(
                f"vm {name!r} is {vm.status.state}; only a running (or paused) vm migrates live"
            )
        view = await self.placement.view()
        nodes = {n.name: n for n in view.nodes}
        snapshot = view.snapshot
        if req.target is not None:
            if req.target == source:
                raise ValidationFailed.one(
                    "target", "other-host", f"vm {name} already runs on {source}; name another host"
                )
            if req.target not in nodes:
                raise ValidationFailed.one(
                    "target", "exists", f"no node {req.target!r}; see `corral node ls`"
                )
        source_node = nodes.get(source)
        source_inv = source_node.status.inventory if source_node else None
        source_driver = source_inv.driver if source_inv else None
        kvm = vm.status.runtime.get("qemu.accel") == "kvm"
        reasons: list[NodeReason] = []
        keep = []
        for view_node in snapshot.nodes:
            if view_node.name == source:
                keep.append(view_node)  # the migration filter names it
                continue
            if req.target is not None and view_node.name != req.target:
                continue
            inv = nodes[view_node.name].status.inventory
            if inv is not None and source_driver and inv.driver != source_driver:
                reasons.append(
                    NodeReason(
                        view_node.name, f"runs driver {inv.driver}, the source {source_driver}"
                    )
                )
                continue
            source_cpu = source_inv.cpu if source_inv else None
            gap = cpu_gap(source_cpu, inv.cpu if inv else None) if kvm else None
            if gap is not None:
                reasons.append(NodeReason(view_node.name, f"-cpu host guest: {gap}"))
                continue
            keep.append(view_node)
        snapshot = replace(snapshot, nodes=tuple(keep))
        request = replace(vm_request(vm, None, snapshot.groups), source=source)
        plan = schedule(snapshot, request)
        if plan.node is None:
            reasons += [NodeReason(n, why) for n, why in plan.rejected.items() if n != source]
            detail = "; ".join(f"{r.node}: {r.reason}" for r in reasons) or "no other host"
            raise Unschedulable(f"no host can take vm {name} now: {detail}", reasons)
        return vm, plan.node, plan.explain(), await self._local_volumes(vm), plan

    async def _local_volumes(self, vm: Vm) -> list[str]:
        local = []
        for ref in vm.spec.disks:
            volume = await self.ctx.objects.find(Volume, ref.volume)
            if volume is None:
                continue
            pool = await self.ctx.objects.find(Pool, volume.spec.pool)
            if pool is None or not pool.spec.shared:
                local.append(volume.name)
        return local

    async def migrate(
        self, name: str, body: Any, meta: RequestMeta, *, dry_run: bool = False
    ) -> Accepted | dict[str, Any]:
        """Start a live migration (a Migration record and its task, in one transaction), or with
        ``dry_run`` say where it would go and why, host by host."""
        req = parse(MigrationRequest, body if body is not None else {})
        vm, target, why, local, plan = await self.plan(name, req)
        mode = "memory and local disks (mirrored over NBD)" if local else "memory only"
        options = MigrationOptions.model_validate(req.model_dump(exclude={"target"}))
        if dry_run:
            return {
                "vm": name,
                "source": vm.status.node,
                "target": target,
                "reason": why,
                "transfer": mode,
                "local_volumes": local,
                "options": options.model_dump(),
                "placement": plan.as_dict(),
            }
        previous = await self.ctx.objects.find(Migration, name)
        source = await self.ctx.objects.find(Node, str(vm.status.node))
        _, task, ops, expect = migration_records(
            vm,
            target,
            options,
            local,
            why,
            previous,
            actor=meta.actor,
            request_id=meta.request_id,
            trace_id=meta.trace_id,
            cpu=source.status.inventory.cpu if source and source.status.inventory else None,
        )
        try:
            rev = await self.ctx.store.commit(ops, expect)
        except Conflict:
            raise Conflict(f"vm {name!r} changed meanwhile; try again") from None
        task.create_revision = task.mod_revision = rev
        return Accepted(vm, task)

    async def cancel(self, task_id: str) -> Task:
        """Ask the leader to cancel a task; today only migrations can be cancelled."""
        task = await self.ctx.objects.get(Task, task_id)
        if task.final:
            raise Conflict(f"task {task_id} already ended ({task.status.state})")
        if task.spec.action != "migrate":
            raise Conflict(f"task {task_id} ({task.spec.action}) is not a migration")
        name = task.spec.target.name

        def request(m: Migration) -> Migration | None:
            if m.spec.task != task_id:
                raise NotFound(f"task {task_id} has no migration in progress")
            if m.status.phase in ("switched-over", "succeeded"):
                raise Conflict(
                    f"too late: vm {name} already runs on {m.spec.target}; migrate it back with "
                    f"`corral vm migrate {name} --to {m.spec.source}`"
                )
            if m.final or m.status.cancel_requested:
                return None
            m.status.cancel_requested = True
            return m

        try:
            await self.ctx.objects.update(Migration, name, request)
        except NotFound:
            raise NotFound(f"task {task_id} has no migration in progress") from None

        def flag(t: Task) -> Task | None:
            if t.final or t.cancel_requested:
                return None
            t.cancel_requested = True
            return t

        updated = await self.ctx.objects.update(Task, task_id, flag)
        return updated or await self.ctx.objects.get(Task, task_id)
