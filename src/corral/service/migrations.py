"""Live-migration use-cases: ``POST /vms/{name}/migrate`` (a task, or a dry run) and
``POST /tasks/{id}/cancel``. The leader's migration loop does the work
(``corral.control.migrations``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from corral.errors import Conflict, NodeReason, NotFound, Unschedulable, ValidationFailed
from corral.model import Migration, Node, Pool, Task, Vm, Volume, new_id, utcnow
from corral.model.migration import MigrationOptions, MigrationRequest, MigrationSpec
from corral.scheduler import NodeView, Request, Snapshot, schedule
from corral.service.context import RequestMeta, ServiceContext
from corral.service.tasks import new_task
from corral.service.validate import parse
from corral.service.vms import Accepted
from corral.state import Objects

__all__ = ["MigrationService"]

_LIVE_STATES = frozenset({"running", "paused"})


class MigrationService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def _snapshot(self, exclude: str) -> tuple[Snapshot, dict[str, Node]]:
        objects = self.ctx.objects
        nodes, _ = await objects.all(Node)
        vms, _ = await objects.all(Vm)
        used: dict[str, list[int]] = {}
        for vm in vms:
            if vm.status.node:
                u = used.setdefault(vm.status.node, [0, 0, 0])
                u[0] += vm.spec.vcpus
                u[1] += vm.spec.memory_mib
                u[2] += 1
        views = []
        for node in nodes:
            inv = node.status.inventory
            if inv is None or node.name == exclude:
                continue
            u = used.get(node.name, [0, 0, 0])
            views.append(
                NodeView(
                    name=node.name,
                    state=node.status.state,
                    roles=tuple(node.spec.roles),
                    cpus=inv.cpus,
                    memory_mib=inv.memory_mib,
                    used_vcpus=u[0],
                    used_memory_mib=u[1],
                    vms=u[2],
                    labels=dict(node.spec.labels),
                )
            )
        return Snapshot(tuple(views)), {n.name: n for n in nodes}

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

    async def plan(self, name: str, req: MigrationRequest) -> tuple[Vm, str, str, list[str]]:
        """(vm, target, why, local volumes) or the error saying why it cannot migrate now."""
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
        snapshot, nodes = await self._snapshot(exclude=source)
        if req.target is not None:
            if req.target == source:
                raise ValidationFailed.one(
                    "target", "other-host", f"vm {name} already runs on {source}; name another host"
                )
            if req.target not in nodes:
                raise ValidationFailed.one(
                    "target", "exists", f"no node {req.target!r}; see `corral node ls`"
                )
            snapshot = replace(
                snapshot, nodes=tuple(n for n in snapshot.nodes if n.name == req.target)
            )
        source_node = nodes.get(source)
        source_driver = (
            source_node.status.inventory.driver
            if source_node and source_node.status.inventory
            else None
        )
        reasons: list[NodeReason] = []
        compatible = []
        for view in snapshot.nodes:
            node = nodes[view.name]
            inv = node.status.inventory
            if inv is not None and source_driver and inv.driver != source_driver:
                reasons.append(
                    NodeReason(view.name, f"runs driver {inv.driver}, the source {source_driver}")
                )
                continue
            compatible.append(view)
        snapshot = replace(snapshot, nodes=tuple(compatible))
        plan = schedule(
            snapshot, Request(vm=name, vcpus=vm.spec.vcpus, memory_mib=vm.spec.memory_mib)
        )
        if plan.node is None:
            reasons += [NodeReason(n, why) for n, why in plan.rejected.items()]
            detail = "; ".join(f"{r.node}: {r.reason}" for r in reasons) or "no other host"
            raise Unschedulable(f"no host can take vm {name} now: {detail}", reasons)
        return vm, plan.node, plan.explain(), await self._local_volumes(vm)

    async def migrate(
        self, name: str, body: Any, meta: RequestMeta, *, dry_run: bool = False
    ) -> Accepted | dict[str, Any]:
        """Start a live migration (a Migration record and its task, in one transaction), or with
        ``dry_run`` say where it would go and why."""
        req = parse(MigrationRequest, body if body is not None else {})
        vm, target, why, local = await self.plan(name, req)
        mode = "memory and local disks (mirrored over NBD)" if local else "memory only"
        if dry_run:
            return {
                "vm": name,
                "source": vm.status.node,
                "target": target,
                "reason": why,
                "transfer": mode,
                "local_volumes": local,
                "options": MigrationOptions.model_validate(
                    req.model_dump(exclude={"target"})
                ).model_dump(),
            }
        options = MigrationOptions.model_validate(req.model_dump(exclude={"target"}))
        assert vm.status.node is not None
        task = new_task(
            self.ctx,
            meta,
            "migrate",
            name,
            {
                "vm_id": vm.id,
                "source": vm.status.node,
                "target": target,
                **options.model_dump(exclude_none=True),
            },
        )
        task.deadline_at = task.created_at + timedelta(seconds=options.timeout_s + 120)
        now = utcnow()
        runtime = vm.status.runtime
        migration = Migration(
            name=name,
            id=new_id(),
            created_at=now,
            updated_at=now,
            spec=MigrationSpec(
                vm=name,
                vm_id=vm.id,
                source=vm.status.node,
                target=target,
                task=task.id,
                options=options,
                local_volumes=local,
                machine=runtime.get("qemu.machine", "q35"),
                accel=runtime.get("qemu.accel"),
                qemu_version=runtime.get("qemu.version"),
            ),
        )
        migration.status.message = f"accepted: {why}; transfer: {mode}"
        previous = await self.ctx.objects.find(Migration, name)
        expect = [
            Objects.expect_unchanged(vm),
            Objects.expect_unchanged(previous)
            if previous is not None
            else Objects.expect_missing(Migration, name),
        ]
        try:
            rev = await self.ctx.store.commit([Objects.put(migration), Objects.put(task)], expect)
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
            raise Conflict(
                f"task {task_id} ({task.spec.action}) cannot be cancelled; only migrations can "
                "(a start or stop is undone by the opposite action)"
            )
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
        return await self.ctx.objects.get(Task, task_id)
