"""Templates and clones: new VMs whose disks are copies (full) or thin overlays (linked) of
another VM's or a template's volumes.

- ``TemplateService.create``: a stopped VM becomes a template. In one transaction the template
  is recorded, the VM's volumes are handed to it (``attached_to: template:<name>``, so nothing
  can attach, write or delete them) and the VM is deleted (its disks stay). Their files are then
  made read-only on their host.
- ``TemplateService.instantiate``: linked clones of the template's volumes (qcow2 overlays whose
  backing file is the template's file; same pool, so the same host or a shared pool), or full
  copies (``to``: on another host); then a VM with the template's hardware and new MAC
  addresses, created like any VM.
- ``TemplateService.delete``: refused while linked clones depend on its volumes (the error lists
  them) unless ``full_clones_first``, which flattens each (stopped) dependant into a standalone
  file first.
- ``TemplateService.clone``: a new VM from a VM's disks; a running VM keeps running. Full
  copies (read from a temporary internal snapshot of a running VM; ``to``: on another host), or
  ``linked``: the VM's disks become read-only bases it shares with the clone (refused while the
  VM has snapshots, which the bases would hold). How the files are made: ``service/clones.py``.

Disk files are made on their host (``call_host_vms``) before the VM is recorded, so the new VM's
host never mistakes a missing clone for a volume still to create.
"""

from __future__ import annotations

import builtins
from typing import Any

from corral.control.hostcall import call_host_vms
from corral.control.vms import assigned_disk
from corral.errors import Conflict, CorralError, ValidationFailed
from corral.model import Node, Pool, Vm, Volume, new_id, utcnow
from corral.model.storage import BASE_HOLDER, VolumeSpec, VolumeStatus
from corral.model.template import (
    TEMPLATE_HOLDER,
    CloneRequest,
    InstantiateRequest,
    Template,
    TemplateCreate,
    TemplateSpec,
    holder,
)
from corral.model.vm import VmNic
from corral.service.clones import CloneMode, DiskCloner
from corral.service.context import RequestMeta, ServiceContext
from corral.service.snapshots import SnapshotService
from corral.service.tasks import new_task
from corral.service.validate import parse
from corral.service.vms import Accepted, VmService
from corral.state import Delete, Expect, Objects, Put

__all__ = ["TemplateService"]


async def _all(ctx: ServiceContext, model: type[Any]) -> builtins.list[Any]:
    page = await ctx.objects.list(model, limit=1000, cursor=None)
    return page.items


class TemplateService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def list(self) -> tuple[builtins.list[Template], int]:
        page = await self.ctx.objects.list(Template, limit=1000, cursor=None)
        return page.items, page.revision

    async def get(self, name: str) -> Template:
        return await self.ctx.objects.get(Template, name)

    async def _node(self, name: str | None, what: str) -> Node:
        node = await self.ctx.objects.find(Node, name) if name else None
        if node is None or node.status.state != "ready":
            state = node.status.state if node else "unknown"
            raise Conflict(f"{what} lives on host {name or '(none)'}, which is {state}")
        return node

    async def _volumes(self, names: builtins.list[str]) -> builtins.list[Volume]:
        found = []
        for name in names:
            volume = await self.ctx.objects.get(Volume, name)
            if volume.status.state != "ready" or volume.status.node is None:
                raise Conflict(
                    f"volume {name!r} is {volume.status.state} and has no file yet; start the "
                    "vm once (its host creates it) and try again"
                )
            found.append(volume)
        return found

    # -- templates ---------------------------------------------------------------------------

    async def create(self, body: Any, meta: RequestMeta) -> Template:
        req = parse(TemplateCreate, body)
        vm = await self.ctx.objects.get(Vm, req.vm)
        if vm.deleting:
            raise Conflict(f"vm {req.vm!r} is being deleted")
        if vm.spec.power_state != "stopped" or vm.status.state != "stopped":
            raise Conflict(
                f"vm {req.vm!r} is {vm.status.state}: only a stopped vm becomes a template; "
                f"stop it first (`corral vm stop {req.vm}`)"
            )
        if not vm.spec.disks:
            raise Conflict(f"vm {req.vm!r} has no disks to make a template of")
        volumes = await self._volumes([d.volume for d in vm.spec.disks])
        if await self.ctx.objects.find(Template, req.name) is not None:
            raise Conflict(f"template {req.name!r} already exists; pick another name")
        now = utcnow()
        spec = vm.spec.model_copy(deep=True)
        spec.power_state = "stopped"
        spec.nics = [VmNic() for _ in spec.nics]  # every instance gets its own MACs
        template = Template(
            name=req.name,
            id=new_id(),
            created_at=now,
            updated_at=now,
            spec=TemplateSpec(source_vm=vm.name, vm=spec, labels=req.labels),
        )
        ops: builtins.list[Put | Delete] = [Objects.put(template)]
        expect: builtins.list[Expect] = [
            Objects.expect_missing(Template, req.name),
            Objects.expect_unchanged(vm),
        ]
        for volume in volumes:
            volume.status.attached_to = holder(req.name)
            volume.status.message = f"read-only: template {req.name}"
            volume.updated_at = now
            ops.append(Objects.put(volume))
            expect.append(Objects.expect_unchanged(volume))
        # The VM goes (its disks stay, now the template's), tracked by a delete task.
        vm.generation += 1
        vm.deleting = True
        vm.status.state = "deleting"
        vm.updated_at = now
        task = new_task(self.ctx, meta, "delete", vm.name, {"generation": vm.generation})
        task.spec.params["vm_id"] = vm.id
        ops += [Objects.put(vm), Objects.put(task)]
        ops += await SnapshotService(self.ctx).forget_vm(vm)
        rev = await self.ctx.store.commit(ops, expect)
        template.create_revision = template.mod_revision = rev
        for volume in volumes:
            await self._protect(volume)
        return template

    async def _protect(self, volume: Volume) -> None:
        node = await self._node(volume.status.node, f"volume {volume.name}")
        pool = await self.ctx.objects.find(Pool, volume.spec.pool)
        await call_host_vms(
            node, {"op": "protect", "disk": assigned_disk(volume, pool, None).model_dump()}
        )

    async def dependants(self, template: Template) -> builtins.list[Volume]:
        """Linked clones whose backing file is one of the template's volumes."""
        mine = {d.volume for d in template.spec.vm.disks}
        return [
            v
            for v in await _all(self.ctx, Volume)
            if v.spec.backing_volume in mine and v.status.state != "deleting"
        ]

    async def delete(self, name: str, *, full_clones_first: bool = False) -> Template:
        template = await self.get(name)
        users = await self.dependants(template)
        if users and not full_clones_first:
            vms = sorted({v.status.attached_to or v.name for v in users})
            raise Conflict(
                f"template {name!r} has linked clones: {', '.join(vms)}; delete them, or pass "
                "--full-clones-first to copy its data into each of them first"
            )
        bases = [v.name for v in users if v.status.attached_to == BASE_HOLDER]
        if bases and full_clones_first:
            raise Conflict(
                f"template {name!r} is read through the read-only bases {', '.join(bases)} (of "
                "linked clones of its instances), which cannot be rewritten; delete those "
                "clones first"
            )
        for volume in users:
            await self._flatten(volume)
        ops: builtins.list[Put | Delete] = [Objects.delete(Template, name)]
        expect = [Objects.expect_unchanged(template)]
        for ref in template.spec.vm.disks:
            held = await self.ctx.objects.find(Volume, ref.volume)
            if held is None or held.status.attached_to != holder(name):
                continue
            volume = held
            volume.status.attached_to = None
            volume.status.state = "deleting"
            volume.status.message = f"removing its file (template {name} deleted)"
            volume.updated_at = utcnow()
            ops.append(Objects.put(volume))
            expect.append(Objects.expect_unchanged(volume))
        await self.ctx.store.commit(ops, expect)
        return template

    async def _flatten(self, volume: Volume) -> None:
        """Copy the template's data into a linked clone, so it stands alone."""
        user = volume.status.attached_to
        vm = await self.ctx.objects.find(Vm, user) if user else None
        if vm is not None and vm.status.state not in ("stopped", "pending"):
            raise Conflict(
                f"vm {vm.name!r} (a linked clone) is {vm.status.state}: stop it so its disk "
                f"{volume.name} can be made standalone, then delete the template again"
            )
        node = await self._node(volume.status.node, f"volume {volume.name}")
        pool = await self.ctx.objects.find(Pool, volume.spec.pool)
        await call_host_vms(
            node, {"op": "flatten", "disk": assigned_disk(volume, pool, None).model_dump()}
        )
        volume.spec.backing_volume = None
        volume.updated_at = utcnow()
        await self.ctx.store.commit([Objects.put(volume)])

    # -- new VMs from templates and VMs ------------------------------------------------------

    async def instantiate(self, name: str, body: Any, meta: RequestMeta) -> Accepted:
        req = parse(InstantiateRequest, body)
        template = await self.get(name)
        if template.status.state != "ready":
            raise Conflict(f"template {name!r} is {template.status.state}")
        sources = await self._volumes([d.volume for d in template.spec.vm.disks])
        spec = template.spec.vm.model_copy(deep=True)
        mode: CloneMode = "full" if req.full else "linked"
        cloner = DiskCloner(self.ctx)
        pool = await cloner.pool(req.pool, mode)
        to = await cloner.target(req.to, sources, mode, pool)
        return await self._new_vm(
            req.name,
            spec,
            sources,
            None,
            mode=mode,
            to=to,
            pool=pool,
            start=req.start,
            labels={**spec.labels, **req.labels},
            meta=meta,
            action="instantiate",
            origin={"template": name},
        )

    async def clone(self, source: str, body: Any, meta: RequestMeta) -> Accepted:
        req = parse(CloneRequest, body)
        vm = await self.ctx.objects.get(Vm, source)
        if vm.deleting:
            raise Conflict(f"vm {source!r} is being deleted")
        if not vm.spec.disks:
            raise Conflict(f"vm {source!r} has no disks to clone")
        sources = await self._volumes([d.volume for d in vm.spec.disks])
        mode: CloneMode = "link-vm" if req.linked else "full"
        if req.linked:
            snaps, _ = await SnapshotService(self.ctx).list(source)
            if snaps:
                names = ", ".join(s.spec.snapshot for s in snaps)
                raise Conflict(
                    f"vm {source!r} has snapshots ({names}): a linked clone freezes its disks "
                    "into a shared read-only base, where they could no longer be rolled back "
                    f"to; delete them first (`corral vm snapshot delete {source} NAME`) or make "
                    "a full clone (--full)"
                )
        cloner = DiskCloner(self.ctx)
        pool = await cloner.pool(req.pool, mode)
        to = await cloner.target(req.to, sources, mode, pool)
        spec = vm.spec.model_copy(deep=True)
        spec.nics = [VmNic() for _ in spec.nics]
        return await self._new_vm(
            req.name,
            spec,
            sources,
            vm,
            mode=mode,
            to=to,
            pool=pool,
            start=req.start,
            labels={**spec.labels, **req.labels},
            meta=meta,
            action="clone",
            origin={
                "vm": source,
                **({"to": req.to} if req.to else {}),
                **({"pool": req.pool} if req.pool else {}),
            },
        )

    async def _new_vm(
        self,
        name: str,
        spec: Any,
        sources: builtins.list[Volume],
        source_vm: Vm | None,
        *,
        mode: CloneMode,
        to: Node | None,
        pool: Pool | None,
        start: bool,
        labels: dict[str, str],
        meta: RequestMeta,
        action: str,
        origin: dict[str, str],
    ) -> Accepted:
        if await self.ctx.objects.find(Vm, name) is not None:
            raise Conflict(f"vm {name!r} already exists; pick another name")
        if len(name) > 57:
            raise ValidationFailed.one("name", "max-length", "at most 57 characters")
        now = utcnow()
        clones: builtins.list[tuple[Volume, Volume]] = []
        for i, src in enumerate(sources):
            clone_name = f"{name}-disk{i}"
            if await self.ctx.objects.find(Volume, clone_name) is not None:
                raise Conflict(
                    f"volume {clone_name!r} already exists; delete it or pick another name"
                )
            volume = Volume(
                name=clone_name,
                id=new_id(),
                created_at=now,
                updated_at=now,
                spec=VolumeSpec(
                    pool=pool.name if pool is not None else src.spec.pool,
                    size_gib=src.spec.size_gib,
                    backing_volume=src.name if mode == "linked" else None,
                ),
                status=VolumeStatus(
                    state="creating", node=to.name if to is not None else src.status.node
                ),
            )
            clones.append((src, volume))
        task = new_task(self.ctx, meta, action, name, origin)
        rev = await self.ctx.store.commit(
            [Objects.put(v) for _, v in clones] + [Objects.put(task)],
            [Objects.expect_missing(Volume, v.name) for _, v in clones],
        )
        task.mod_revision = rev
        runner = SnapshotService(self.ctx).tasks
        steps = {
            "linked": "linking disks",
            "link-vm": "freezing the source's disks into shared bases",
            "full": "copying disks"
            + (f" to host {to.name}" if to else "")
            + (f" into pool {pool.name}" if pool else ""),
        }
        task = await runner.step(task, 1, steps[mode])
        try:
            await DiskCloner(self.ctx).make(clones, mode, source_vm, to)
            spec.disks = [{"volume": v.name} for _, v in clones]
            body = spec.model_dump(mode="json")
            body.update(
                name=name,
                labels=labels,
                power_state="running" if start else "stopped",
                disks=[{"volume": v.name} for _, v in clones],
            )
            result = await VmService(self.ctx).create(body, meta)
        except CorralError as exc:
            await self._discard([v.name for _, v in clones])
            await runner.finish(task, error=exc.detail)
            raise
        await runner.finish(
            task,
            result={
                "vm": name,
                "volumes": [v.name for _, v in clones],
                "linked": mode != "full",
                "create_task": result.task.id,
                **({"to": to.name} if to else {}),
                **({"pool": pool.name} if pool else {}),
            },
        )
        return result

    async def _discard(self, names: builtins.list[str]) -> None:
        """Undo a clone that failed half-way: made files go through the volume loop."""
        ops: builtins.list[Put | Delete] = []
        for name in names:
            volume = await self.ctx.objects.find(Volume, name)
            if volume is None:
                continue
            if volume.status.state == "ready":
                volume.status.state = "deleting"
                volume.status.message = "clone failed"
                ops.append(Objects.put(volume))
            else:
                ops.append(Objects.delete(Volume, volume.name))
        if ops:
            await self.ctx.store.commit(ops)


def is_template_holder(attached_to: str | None) -> bool:
    return bool(attached_to and attached_to.startswith(TEMPLATE_HOLDER))
