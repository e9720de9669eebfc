"""VM use-cases: validate, stamp, and write the intent plus its task in one transaction.

Handlers never talk to a hypervisor: they write intents; the leader's loops and the node agents
act on them, and the task records what happened.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, Literal

from corral.errors import Conflict, NotFound, PreconditionFailed, ValidationFailed
from corral.model import (
    Image,
    Migration,
    Task,
    Vm,
    VmCreate,
    VmDisk,
    VmSpec,
    VmStatus,
    Volume,
    new_id,
    utcnow,
)
from corral.model.common import Strict, labels_match, merge_patch, parse_label_selector
from corral.model.vm import MAX_DISKS, VM_STATES, new_mac
from corral.service.context import RequestMeta, ServiceContext
from corral.service.idempotency import IdempotencyGuard
from corral.service.placement import PlacementService
from corral.service.storage import VolumeService
from corral.service.tasks import new_task
from corral.service.validate import parse
from corral.state import Expect, Objects, Put
from corral.state.store import make_cursor

__all__ = ["Accepted", "VmList", "VmService"]

Action = Literal["start", "stop", "reboot", "pause", "resume", "delete"]
_PATCHABLE = {
    "vcpus",
    "memory_mib",
    "labels",
    "restart_policy",
    # Placement fields apply the next time the VM is placed (or moved).
    "group",
    "node_selector",
    "required_labels",
    "affinity_vm",
    "spread_over",
    "priority",
    "placement_policy",
}
# Observed states in which there is no guest to pause, resume or reboot.
_DOWN_STATES = frozenset({"stopped", "crashed"})


@dataclass(frozen=True)
class Accepted:
    """A change accepted for work: the object as written and its task."""

    vm: Vm
    task: Task
    replayed: bool = False


@dataclass(frozen=True)
class VmList:
    items: list[Vm]
    next_cursor: str | None
    revision: int


class StopBody(Strict):
    """Body of ``POST /vms/{name}/stop``: ``force`` powers off without a guest shutdown."""

    force: bool = False


class VmService:
    def __init__(self, ctx: ServiceContext, placement: PlacementService | None = None) -> None:
        self.ctx = ctx
        self.placement = placement

    # -- reads -----------------------------------------------------------------------------

    async def get(self, name: str, *, stale: bool = False) -> Vm:
        return await self.ctx.objects.get(Vm, name, serializable=stale)

    async def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        label: str | None = None,
        node: str | None = None,
        state: str | None = None,
        stale: bool = False,
    ) -> VmList:
        try:
            terms = parse_label_selector(label) if label else []
        except ValueError as exc:
            raise ValidationFailed.one("label", "selector", str(exc)) from None
        if state and state not in VM_STATES:
            raise ValidationFailed.one("state", "one-of", f"must be one of {', '.join(VM_STATES)}")

        def keep(vm: Vm) -> bool:
            if node and vm.status.node != node:
                return False
            if state and vm.status.state != state:
                return False
            return labels_match(vm.spec.labels, terms)

        items: list[Vm] = []
        nxt = cursor
        revision = 0
        while True:
            page = await self.ctx.objects.list(Vm, limit=limit, cursor=nxt, serializable=stale)
            revision = revision or page.revision
            for i, vm in enumerate(page.items):
                if keep(vm):
                    items.append(vm)
                    if len(items) == limit:
                        more = i < len(page.items) - 1 or page.next_cursor is not None
                        cur = make_cursor(revision, Objects.key(Vm, vm.name)) if more else None
                        return VmList(items, cur, revision)
            nxt = page.next_cursor
            if nxt is None:
                return VmList(items, None, revision)

    # -- create ----------------------------------------------------------------------------

    async def create(
        self, body: Any, meta: RequestMeta, *, parsed: VmCreate | None = None
    ) -> Accepted:
        """Create a VM and its create task atomically (with the idempotency record).

        ``parsed`` is ``body`` already validated as a ``VmCreate`` (the REST layer's framework
        does that), so it is not validated twice."""
        req = parsed if parsed is not None else parse(VmCreate, body)
        guard = IdempotencyGuard(self.ctx, "vms", meta.idempotency_key, body)
        replay = await guard.replay(stale=True)
        if replay is not None:
            return await self._replayed(replay.response)
        if self.placement is not None:
            await self.placement.check_refs(req.group)
        now = utcnow()
        vm = Vm(
            name=req.name,
            id=new_id(),
            created_at=now,
            updated_at=now,
            spec=req.spec(),
            status=VmStatus(state="pending", message="waiting for placement"),
        )
        for nic in vm.spec.nics:
            nic.mac = nic.mac or new_mac()
        volume_ops, volume_expect = await self._volumes_for(req, vm)
        vm.power_generation = vm.generation
        expected = vm.spec.power_state
        task = new_task(
            self.ctx,
            meta,
            "create",
            vm.name,
            {"generation": vm.generation, "expected_state": expected, "vm_id": vm.id},
        )
        ops: list[Put] = [
            Objects.put(vm),
            Objects.put(task),
            *volume_ops,
            *guard.ops(202, {"vm": vm.name, "task": task.id}),
        ]
        try:
            rev = await self.ctx.store.commit(
                ops, [Objects.expect_missing(Vm, vm.name), *volume_expect, *guard.expect()]
            )
        except Conflict:
            replay = await guard.replay()
            if replay is not None:
                return await self._replayed(replay.response)
            raise Conflict(
                f"vm {vm.name!r} already exists; pick another name or delete it first"
            ) from None
        for obj in (vm, task):
            obj.create_revision = obj.mod_revision = rev
        return Accepted(vm, task)

    async def _volumes_for(
        self, req: VmCreate, vm: Vm
    ) -> tuple[builtins.list[Put], builtins.list[Expect]]:
        """The boot volume made from ``image`` and the listed volumes, attached to ``vm``."""
        ops: builtins.list[Put] = []
        expect: builtins.list[Expect] = []
        if req.image is not None and not any(d.volume == f"{req.name}-disk0" for d in req.disks):
            boot_name = f"{req.name}-disk0"
            if len(boot_name) > 63:
                raise ValidationFailed.one(
                    "name", "max-length", "with image, at most 57 characters (<name>-disk0)"
                )
            boot, _, _ = await VolumeService(self.ctx).new_volume(
                boot_name,
                pool=req.pool,
                size_gib=req.disk_gib,
                image=req.image,
                full_clone=req.full_clone,
                labels={},
            )
            boot.status.attached_to = vm.name
            ops.append(Objects.put(boot))
            expect.append(Objects.expect_missing(Volume, boot_name))
            vm.spec.disks.insert(0, VmDisk(volume=boot_name))
            if len(vm.spec.disks) > MAX_DISKS:
                raise ValidationFailed.one("disks", "max-length", f"at most {MAX_DISKS} disks")
        elif req.image is not None or req.disk_gib is not None:
            if req.image is None:
                raise ValidationFailed.one("disk_gib", "image", "disk_gib needs an image")
            image = await self.ctx.objects.find(Image, req.image)
            if image is None:
                raise ValidationFailed.one("image", "exists", f"no image {req.image!r}")
        for i, ref in enumerate(req.disks):
            volume = await self.ctx.objects.find(Volume, ref.volume)
            if volume is None:
                raise ValidationFailed.one(
                    f"disks.{i}.volume",
                    "exists",
                    f"no volume {ref.volume!r}; see `corral volume ls`",
                )
            if volume.status.attached_to or volume.status.state not in ("pending", "ready"):
                raise ValidationFailed.one(
                    f"disks.{i}.volume",
                    "available",
                    f"volume {ref.volume!r} is "
                    + (
                        f"attached to vm {volume.status.attached_to}"
                        if volume.status.attached_to
                        else volume.status.state
                    ),
                )
            volume.status.attached_to = vm.name
            volume.updated_at = utcnow()
            ops.append(Objects.put(volume))
            expect.append(Objects.expect_unchanged(volume))
        return ops, expect

    async def _replayed(self, refs: dict[str, Any]) -> Accepted:
        task = await self.ctx.objects.get(Task, str(refs["task"]))
        vm = await self.ctx.objects.find(Vm, str(refs["vm"]))
        if vm is None:
            raise NotFound(
                f"vm {refs['vm']!r} created by this Idempotency-Key has since been deleted"
            )
        return Accepted(vm, task, replayed=True)

    # -- patch -----------------------------------------------------------------------------

    async def patch(self, name: str, patch: Any, meta: RequestMeta) -> Vm:
        """JSON merge patch of the spec. Hardware changes take effect at the next start."""
        if not isinstance(patch, dict):
            raise ValidationFailed.one("", "type", "the body must be a JSON merge patch object")
        for key in patch:
            if key == "power_state":
                raise ValidationFailed.one(
                    key,
                    "read-only",
                    "change power with POST .../start, .../stop, .../pause or .../resume",
                )
            if key not in _PATCHABLE:
                raise ValidationFailed.one(
                    key,
                    "unknown-field",
                    f"unknown field; patchable: {', '.join(sorted(_PATCHABLE))}",
                )
        if self.placement is not None and isinstance(patch.get("group"), str):
            await self.placement.check_refs(patch["group"])
        current = await self.get(name)
        self._check_if_match(current, meta)
        merged = merge_patch(current.spec.model_dump(mode="json"), patch)
        spec = parse(VmSpec, merged)
        if spec == current.spec:
            return current
        if current.deleting:
            raise Conflict(f"vm {name!r} is being deleted")
        current.spec = spec
        current.generation += 1
        current.updated_at = utcnow()
        rev = await self.ctx.store.commit([Objects.put(current)], [self._expect(current, meta)])
        current.mod_revision = rev
        return current

    # -- actions ---------------------------------------------------------------------------

    async def act(
        self,
        name: str,
        action: Action,
        body: Any,
        meta: RequestMeta,
        *,
        with_disks: bool = False,
    ) -> Accepted:
        """start / stop / reboot / pause / resume / delete: bump the VM's intent generation and
        add a task. Raises Conflict (409) for an action the VM's state does not allow (see
        ``_check_power``). ``delete`` with ``with_disks`` also removes the VM's volumes once
        the VM is gone."""
        force = False
        if action == "stop" and body not in (None, {}):
            force = parse(StopBody, body).force
        elif body not in (None, {}):
            raise ValidationFailed.one("", "empty", f"{action} takes no body")
        guard = IdempotencyGuard(self.ctx, f"vms.{action}", meta.idempotency_key, [name, body])
        replay = await guard.replay()
        if replay is not None:
            return await self._replayed(replay.response)
        migration = await self.ctx.objects.find(Migration, name)
        if migration is not None and not migration.final:
            raise Conflict(
                f"vm {name!r} is migrating to {migration.spec.target}; wait for task "
                f"{migration.spec.task} or cancel it with "
                f"`corral task cancel {migration.spec.task}`"
            )
        for _ in range(8):
            vm = await self.get(name)
            self._check_if_match(vm, meta)
            if vm.deleting and action != "delete":
                raise Conflict(f"vm {name!r} is being deleted")
            if action != "delete":
                self._check_power(vm, action)
            vm.generation += 1
            if action in ("start", "resume"):
                vm.spec.power_state = "running"
                vm.force_stop = False
                vm.power_generation = vm.generation
            elif action == "stop":
                vm.spec.power_state = "stopped"
                vm.force_stop = force
                vm.power_generation = vm.generation
            elif action == "pause":
                vm.spec.power_state = "paused"
                vm.power_generation = vm.generation
            elif action == "reboot":
                vm.reboot_generation = vm.generation
            else:
                vm.deleting = True
                if vm.status.state != "deleting":
                    vm.status.state = "deleting"
            vm.updated_at = utcnow()
            params: dict[str, Any] = {"generation": vm.generation, "vm_id": vm.id}
            if action != "delete":
                params["expected_state"] = vm.spec.power_state
            if force:
                params["force"] = True
            task = new_task(self.ctx, meta, action, name, params)
            disk_ops: builtins.list[Put] = []
            disk_expect: builtins.list[Expect] = []
            if action == "delete" and with_disks:
                for ref in vm.spec.disks:
                    volume = await self.ctx.objects.find(Volume, ref.volume)
                    if volume is None or volume.status.state == "deleting":
                        continue
                    volume.status.state = "deleting"
                    volume.status.message = f"removed once vm {name} is gone"
                    volume.updated_at = utcnow()
                    disk_ops.append(Objects.put(volume))
                    disk_expect.append(Objects.expect_unchanged(volume))
            try:
                rev = await self.ctx.store.commit(
                    [
                        Objects.put(vm),
                        Objects.put(task),
                        *disk_ops,
                        *guard.ops(202, {"vm": name, "task": task.id}),
                    ],
                    [self._expect(vm, meta), *disk_expect, *guard.expect()],
                )
            except Conflict:
                replay = await guard.replay()
                if replay is not None:
                    return await self._replayed(replay.response)
                continue  # the VM changed under us (a node report): re-read and re-apply
            vm.mod_revision = task.create_revision = task.mod_revision = rev
            return Accepted(vm, task)
        raise Conflict(f"vm {name!r} kept changing; try again")

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check_power(vm: Vm, action: str) -> None:
        """Refuse (Conflict) pause, resume and reboot of a VM that has no running guest.

        ``start`` and ``stop`` are always accepted: they say what the VM should be, whatever it
        is now (``start`` on a paused VM resumes it). ``resume`` of a VM that runs is accepted
        and changes nothing. A crashed VM is refused too, even one its restart policy is about
        to restart: the user starts it (or waits) first.
        """
        if action in ("start", "stop"):
            return
        name = vm.name
        want, seen = vm.spec.power_state, vm.status.state
        start = f"start it first with `corral vm start {name}` (POST /api/v1/vms/{name}/start)"
        if want == "stopped":
            raise Conflict(f"vm {name!r} is stopped (its desired power state); {start}")
        if seen in _DOWN_STATES:
            raise Conflict(f"vm {name!r} is {seen}; {start}")
        if action == "reboot" and want == "paused":
            raise Conflict(f"vm {name!r} is paused; resume it first with `corral vm resume {name}`")

    @staticmethod
    def _check_if_match(vm: Vm, meta: RequestMeta) -> None:
        if meta.if_match is not None and meta.if_match != vm.mod_revision:
            raise PreconditionFailed(
                f"vm {vm.name!r} is at revision {vm.mod_revision}, not {meta.if_match}; "
                "re-read it and retry"
            )

    @staticmethod
    def _expect(vm: Vm, meta: RequestMeta) -> Expect:
        if meta.if_match is not None:
            return Expect(Objects.key(Vm, vm.name), mod_revision=meta.if_match)
        return Objects.expect_unchanged(vm)
