"""The VM loop: place pending VMs, keep each placed VM's assignment in step with its intent,
and remove deleted VMs."""

from __future__ import annotations

import logging
from typing import Protocol

from corral.control.context import LeaderContext
from corral.control.queue import Outcome
from corral.model import Assignment, Image, Migration, Node, Pool, Vm, Volume
from corral.model.assignment import AssignedBoot, AssignedDisk, AssignedImageFile
from corral.state import Delete, Objects, Put, keys
from corral.state.codec import encode

__all__ = ["Placer", "VmLoop", "assigned_disk", "desired_assignment", "image_file", "volume_host"]

log = logging.getLogger(__name__)


class Placer(Protocol):
    """Where the VM loop hands VMs without a node (``control.placement.PlacementLoop``)."""

    def want(self, vm: str) -> Outcome: ...


def image_file(image: Image, file: str) -> AssignedImageFile | None:
    stored = image.status.files.get(file)
    if stored is None:
        return None
    return AssignedImageFile(
        image=image.name,
        image_id=image.id,
        file=file,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        format=stored.format,
    )


def assigned_disk(volume: Volume, pool: Pool | None, image: Image | None) -> AssignedDisk:
    """What a host needs to find, create, grow or remove the volume's file."""
    return AssignedDisk(
        volume=volume.name,
        volume_id=volume.id,
        file_name=volume.file_name,
        pool=volume.spec.pool,
        pool_path=pool.spec.path if pool else None,
        shared=pool.spec.shared if pool else False,
        size_gib=volume.spec.size_gib,
        image=image_file(image, "disk") if image else None,
        full_clone=volume.spec.full_clone,
        created_on=volume.status.node if volume.status.state == "ready" else None,
    )


def resolve_disks(ctx: LeaderContext, vm: Vm) -> tuple[list[AssignedDisk], AssignedBoot | None]:
    """What the VM's host needs to find or make each disk, and how the VM boots."""
    disks: list[AssignedDisk] = []
    for ref in vm.spec.disks:
        volume = ctx.peek(Volume, ref.volume)
        if volume is None:
            log.warning("vm %s lists volume %s, which does not exist", vm.name, ref.volume)
            continue
        pool = ctx.peek(Pool, volume.spec.pool)
        image = ctx.peek(Image, volume.spec.image) if volume.spec.image else None
        disks.append(assigned_disk(volume, pool, image))
    boot = None
    image = ctx.peek(Image, vm.spec.image) if vm.spec.image else None
    if image is not None:
        if image.spec.boot == "direct-kernel":
            boot = AssignedBoot(
                kernel=image_file(image, "kernel"),
                initrd=image_file(image, "initrd"),
                cmdline=image.spec.cmdline,
            )
        else:
            boot = AssignedBoot(kernel=None)
    return disks, boot


def volume_host(ctx: LeaderContext, vm: Vm) -> tuple[str, str] | None:
    """(host, volume) when one of the VM's volumes lives on one host's own disk."""
    for ref in vm.spec.disks:
        volume = ctx.peek(Volume, ref.volume)
        if volume is None or volume.status.node is None:
            continue
        pool = ctx.peek(Pool, volume.spec.pool)
        if pool is not None and pool.spec.shared:
            continue
        return volume.status.node, volume.name
    return None


def desired_assignment(vm: Vm, ctx: LeaderContext) -> Assignment:
    assert vm.status.node is not None
    disks, boot = resolve_disks(ctx, vm)
    return Assignment(
        vm=vm.name,
        vm_id=vm.id,
        node=vm.status.node,
        epoch=vm.status.epoch,
        generation=vm.generation,
        reboot_generation=vm.reboot_generation,
        power_generation=vm.power_generation,
        force_stop=vm.force_stop,
        spec=vm.spec,
        disks=disks,
        boot=boot,
    )


class VmLoop:
    def __init__(self, ctx: LeaderContext, placer: Placer) -> None:
        self.ctx = ctx
        self.placer = placer

    async def reconcile(self, name: str) -> Outcome:
        # Read-only views of the cache: this loop writes assignments and deletes, never the VM.
        vm = self.ctx.peek(Vm, name)
        if vm is None:
            return Outcome()
        migration = self.ctx.peek(Migration, name)
        if migration is not None and not migration.final and not vm.deleting:
            return Outcome()  # the migration loop owns the VM's assignments meanwhile
        if vm.deleting:
            return await self._delete(vm)
        if vm.status.node is None:
            return self.placer.want(vm.name)
        return await self._sync_assignment(vm)

    async def _sync_assignment(self, vm: Vm) -> Outcome:
        assert vm.status.node is not None
        want = desired_assignment(vm, self.ctx)
        have = self.ctx.assignment(vm.status.node, vm.name)
        if have is not None and have[0] == want:
            return Outcome()
        await self.ctx.commit(
            [Put(keys.assign_key(vm.status.node, vm.name), encode("assignment", want))],
            [Objects.expect_unchanged(vm)],
        )
        return Outcome(
            f"asking node {vm.status.node} to apply generation {vm.generation} of vm {vm.name}"
        )

    async def _delete(self, vm: Vm) -> Outcome:
        node = vm.status.node
        if node is None:
            await self.ctx.commit(
                [Objects.delete(Vm, vm.name), Delete(keys.placement_key(vm.name))],
                [Objects.expect_unchanged(vm)],
            )
            return Outcome(f"deleted vm {vm.name} (it was never placed)")
        host = self.ctx.peek(Node, node)
        if host is None or host.status.state in ("down", "left"):
            # Its host cannot confirm: forget the VM now; the host's agent drops it (its
            # assignment is gone) if it ever comes back.
            ops: list[Put | Delete] = [
                Objects.delete(Vm, vm.name),
                Delete(keys.placement_key(vm.name)),
            ]
            if self.ctx.assignment(node, vm.name) is not None:
                ops.append(Delete(keys.assign_key(node, vm.name)))
            await self.ctx.commit(ops, [Objects.expect_unchanged(vm)])
            state = host.status.state if host else "gone"
            return Outcome(f"deleted vm {vm.name} whose host {node} is {state}")
        if self.ctx.assignment(node, vm.name) is not None:
            await self.ctx.commit([Delete(keys.assign_key(node, vm.name))])
            return Outcome(f"asking node {node} to remove vm {vm.name}")
        seen = vm.status.observed_epoch
        never = vm.status.started_at is None and vm.status.observed_generation == 0
        if (seen is not None and seen < vm.status.epoch) or (seen is None and never):
            # The host never reported this placement (moved or placed there, then deleted
            # before it reported): it will never report it gone. Its assignment is gone, so its
            # agent drops the VM if it had received it after all.
            await self.ctx.commit(
                [Objects.delete(Vm, vm.name), Delete(keys.placement_key(vm.name))],
                [Objects.expect_unchanged(vm)],
            )
            return Outcome(
                f"deleted vm {vm.name}: node {node} never reported it (epoch {vm.status.epoch})"
            )
        return Outcome(f"waiting for node {node} to remove vm {vm.name}")
