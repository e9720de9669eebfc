"""The volume loop: remove volumes marked ``deleting`` once no VM uses them, and let go of
volumes whose VM is gone.

A volume's file is removed through its host (``hostcall``); when that host does not answer the
volume stays ``deleting`` with the reason, and is retried. A volume that never got a file
(``pending``) goes at once. A host that is down for good (``left``) has no file to remove.

A volume other volumes read through (their ``spec.backing_volume``: a template's volume, or the
frozen base of a VM's linked clones) keeps its file while any of them exists. A frozen base
(``attached_to`` ``BASE_HOLDER``) goes by itself once the last one is gone.
"""

from __future__ import annotations

from corral.control.context import LeaderContext
from corral.control.hostcall import call_host_storage
from corral.control.queue import Outcome
from corral.control.vms import assigned_disk
from corral.errors import CorralError
from corral.model import Volume
from corral.model.common import utcnow
from corral.model.storage import BASE_HOLDER
from corral.state import Objects

__all__ = ["VolumeLoop"]

RETRY_S = 10.0


class VolumeLoop:
    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    def _dependants(self, name: str, *, besides: str | None = None) -> list[str]:
        """The volumes that read through volume ``name`` (it is their backing volume)."""
        return sorted(
            v.name
            for v in self.ctx.all(Volume)
            if v.spec.backing_volume == name and v.name != besides
        )

    async def _release_base(self, name: str, gone: str) -> None:
        """Volume ``gone`` was deleted: its base goes too when nothing else reads it."""
        base = self.ctx.volume(name)
        if base is None or base.status.attached_to != BASE_HOLDER:
            return
        if self._dependants(name, besides=gone):
            return
        base.status.attached_to = None
        base.status.state = "deleting"
        base.status.message = f"removing its file (its last linked clone, {gone}, is gone)"
        base.updated_at = utcnow()
        await self.ctx.commit([Objects.put(base)], [Objects.expect_unchanged(base)])

    def _user(self, volume: Volume) -> str | None:
        """The VM that still lists the volume among its disks, if any."""
        name = volume.status.attached_to
        if not name:
            return None
        if name.startswith("template:"):
            return name  # a template's read-only volume: held for as long as the template
        vm = self.ctx.vm(name)
        if vm is None or not any(d.volume == volume.name for d in vm.spec.disks):
            return None
        return name

    async def reconcile(self, name: str) -> Outcome:
        volume = self.ctx.volume(name)
        if volume is None:
            return Outcome()
        readers = self._dependants(name)
        if volume.status.attached_to == BASE_HOLDER:
            if readers:
                return Outcome()
            volume.status.attached_to = None
            volume.status.state = "deleting"
            volume.status.message = "removing its file (no linked clone reads it any more)"
            volume.updated_at = utcnow()
            await self.ctx.commit([Objects.put(volume)], [Objects.expect_unchanged(volume)])
            return Outcome(f"volume {name}: no linked clone reads it any more")
        user = self._user(volume)
        if volume.status.attached_to and user is None:
            volume.status.attached_to = None
            volume.updated_at = utcnow()
            await self.ctx.commit([Objects.put(volume)], [Objects.expect_unchanged(volume)])
            return Outcome(f"volume {name} is no longer attached (its vm is gone)")
        if volume.status.state != "deleting":
            return Outcome()
        if user is not None:
            return Outcome(f"volume {name} waits for vm {user} to go", requeue_after=RETRY_S)
        if readers:
            message = f"waits for its linked clones to go: {', '.join(readers)}"
            if volume.status.message != message:
                volume.status.message = message
                volume.updated_at = utcnow()
                await self.ctx.commit([Objects.put(volume)], [Objects.expect_unchanged(volume)])
            return Outcome(f"volume {name} {message}", requeue_after=RETRY_S)
        host = self.ctx.node(volume.status.node) if volume.status.node else None
        if volume.status.path and host is not None and host.status.state != "left":
            pool = self.ctx.pool(volume.spec.pool)
            try:
                await call_host_storage(
                    host, {"op": "delete", "disk": assigned_disk(volume, pool, None).model_dump()}
                )
            except CorralError as exc:
                message = f"cannot remove its file yet: {exc.detail}"
                if volume.status.message != message:
                    volume.status.message = message
                    volume.updated_at = utcnow()
                    await self.ctx.commit([Objects.put(volume)], [Objects.expect_unchanged(volume)])
                return Outcome(f"volume {name}: {message}", requeue_after=RETRY_S)
        await self.ctx.commit([Objects.delete(Volume, name)], [Objects.expect_unchanged(volume)])
        if volume.spec.backing_volume:
            await self._release_base(volume.spec.backing_volume, name)
        return Outcome(f"deleted volume {name}")
